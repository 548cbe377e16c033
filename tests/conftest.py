"""Shared fixtures: synthetic checkpoints written in the exact hub format, and the oracle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlx_gptoss.synthetic import TINY, hf_config, write_hf_checkpoint


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """`make(name, seed=0, num_shards=3, **config_overrides) -> Path`, cached per name."""
    made: dict[str, Path] = {}

    def make(name: str, *, seed: int = 0, num_shards: int = 3, expert_gain: float = 3.0,
             **overrides) -> Path:
        if name not in made:
            cfg = hf_config(**{**TINY, **overrides})
            made[name] = write_hf_checkpoint(tmp_path_factory.mktemp(name), cfg, seed=seed,
                                             num_shards=num_shards, expert_gain=expert_gain)
        return made[name]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory("tiny")


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
