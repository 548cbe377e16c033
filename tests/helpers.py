"""Plain helpers shared by test modules (no fixtures: those are in conftest.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that runs this checkout's code (offline, as set by
    conftest), plus `extra`."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def reference_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    """float32 logits from transformers' GptOssForCausalLM on torch CPU (the oracle)."""
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True)
    )
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def reference_greedy(path: Path, prompt: np.ndarray, steps: int) -> list[int]:
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True)
    )
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt), max_new_tokens=steps, do_sample=False,
                             min_new_tokens=steps, eos_token_id=None, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
