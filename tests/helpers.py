"""Plain helpers shared by test modules (no fixtures: those are in conftest.py)."""
from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    import mlx.core as mx

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


# The ways back `PromptCache.prepare` can take (see `rewind_through`).
REWIND_CASES = ("extend", "trim", "snapshot", "reset")


def rewind_through(model, cache, case: str, ids) -> tuple[list[int], list[int]]:
    """Prefill 5 windows of `ids(n, seed)` into `cache` in two marked parts, then `prepare` a
    prompt that keeps as much history as `case` says; returns (prompt, tokens left to
    prefill) after checking where the cache restarted."""
    import mlx.core as mx

    from mlx_gptoss.model import prefill

    window = model.config.sliding_window
    history = ids(5 * window, 2)
    marked = 2 * window + 3
    for part in (history[:marked], history[marked:]):
        prefill(model, mx.array([part]), cache.layers)
        cache.advance(part)
        cache.mark()
    keep, expected_start = {
        "extend": (len(history), len(history)),
        "trim": (len(history) - 2, len(history) - 2),
        "snapshot": (marked + window, marked),
        "reset": (marked - 1, 0),
    }[case]
    prompt = history[:keep] + ids(6, 3)
    todo = cache.prepare(prompt)
    assert len(prompt) - len(todo) == expected_start
    return prompt, todo


@contextmanager
def local_site(handler: type) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 (a free port) answering with `handler`; yields its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def random_tokens(n: int, seed: int = 0, vocab: int = 256) -> mx.array:
    """`[1, n]` random token ids below `vocab` (the tiny checkpoints' vocabulary by default)."""
    import mlx.core as mx

    return mx.array(np.random.default_rng(seed).integers(0, vocab, (1, n)))
