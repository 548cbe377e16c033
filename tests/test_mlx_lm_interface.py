"""mlx-lm's own generation loop can drive this model (its model/cache interface is followed)."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from mlx_gptoss.loading import load_model
from mlx_gptoss.model import prefill


def test_mlx_lm_generate_step_matches_our_greedy_loop(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint, "float32")
    prompt = mx.array(np.random.default_rng(5).integers(0, 256, 20))
    theirs = [int(token) for token, _ in zip(
        (t for t, _ in generate_step(prompt, model, max_tokens=25, prefill_step_size=7,
                                     sampler=lambda logits: mx.argmax(logits, axis=-1))),
        range(25))]
    cache = make_prompt_cache(model)
    logits = prefill(model, prompt[None], cache, chunk_size=7)
    ours = []
    for _ in range(25):
        token = int(mx.argmax(logits, axis=-1).item())
        ours.append(token)
        logits = model(mx.array([[token]]), cache=cache)[:, -1, :]
    assert theirs == ours
