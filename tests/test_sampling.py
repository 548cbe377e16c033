"""The sampler against transformers' logits warpers (the oracle) and by its statistics."""
from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mlx_gptoss.errors import ConfigError, GptOssError
from mlx_gptoss.sampling import SamplingParams, filter_logits, make_sampler

PARAMS = [
    SamplingParams(temperature=0.7, top_p=0.9, top_k=50, min_p=0.05),
    SamplingParams(temperature=1.0, top_p=0.5),
    SamplingParams(temperature=1.3, top_k=10, min_p=0.2),
    SamplingParams(temperature=1.0, min_p=0.5),
    SamplingParams(temperature=2.0, top_k=1),
    SamplingParams(temperature=1.0, top_p=1.0),
]


def transformers_filter(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """transformers applies temperature, top-k, top-p, min-p in this order."""
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        warpers.append(MinPLogitsWarper(p.min_p))
    scores = torch.tensor(logits)
    for warper in warpers:
        scores = warper(None, scores)
    return scores.numpy()


@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_filter_matches_transformers(params):
    logits = (np.random.default_rng(0).normal(size=(4, 3000)) * 3).astype(np.float32)
    logits[0, :20] = logits[0, 0]  # ties at the top, where top-k keeps every tied token
    got = np.array(filter_logits(mx.array(logits), params))
    want = transformers_filter(logits, params)
    kept = np.isfinite(want)
    assert (np.isfinite(got) == kept).all()
    assert kept.sum(-1).min() >= 1
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6)
    if params.top_p < 1 or params.top_k or params.min_p:
        assert (~kept).any(), "the filter must remove something for this comparison to matter"


def test_greedy_is_argmax():
    logits = mx.array(np.random.default_rng(1).normal(size=(5, 100)).astype(np.float32))
    sample = make_sampler(SamplingParams(temperature=0))
    assert np.array_equal(np.array(sample(logits)), np.array(logits).argmax(-1))


def test_seed_makes_sampling_reproducible():
    logits = mx.array(np.zeros((1, 1000), np.float32))

    def draws(seed):
        sample = make_sampler(SamplingParams(seed=seed))
        return [int(sample(logits)[0].item()) for _ in range(20)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert len(set(draws(7))) > 10  # successive steps use fresh randomness


def test_sample_frequencies_follow_the_filtered_distribution():
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=6, seed=3)
    row = np.log(np.array([0.3, 0.25, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01], np.float32))
    want = np.exp(transformers_filter(row[None], params)[0].astype(np.float64))
    want /= want.sum()
    n = 20000
    draws = np.array(make_sampler(params)(mx.array(np.tile(row, (n, 1)))))
    freq = np.bincount(draws, minlength=row.size) / n
    assert (freq[want == 0] == 0).all()
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_defaults_come_from_generation_config(tmp_path):
    config = tmp_path / "generation_config.json"
    config.write_text(json.dumps({"do_sample": True, "eos_token_id": [200002]}))
    assert SamplingParams.from_model_dir(tmp_path) == SamplingParams(1.0, 1.0, 0, 0.0)
    config.write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.1}))
    assert SamplingParams.from_model_dir(tmp_path) == SamplingParams(0.6, 0.95, 20, 0.1)
    config.write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert SamplingParams.from_model_dir(tmp_path).greedy
    assert SamplingParams.from_model_dir(tmp_path / "missing") == SamplingParams()
    config.write_text("{not json")
    with pytest.raises(ConfigError, match="generation_config.json"):
        SamplingParams.from_model_dir(tmp_path)
    config.write_text(json.dumps({"top_k": "many"}))
    with pytest.raises(ConfigError, match="top_k"):
        SamplingParams.from_model_dir(tmp_path)


def test_overrides_and_validation():
    base = SamplingParams(0.6, 0.95)
    assert base.with_overrides(temperature=None, top_k=5) == SamplingParams(0.6, 0.95, 5)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                dict(min_p=2)):
        with pytest.raises(GptOssError):
            SamplingParams(**bad)


def test_seed_must_fit_a_random_key():
    """mx.random.key takes an unsigned 64-bit seed; anything else is a user error, not a
    TypeError from deep inside the sampler."""
    for bad in (-1, 2**64):
        with pytest.raises(GptOssError, match=f"seed must be in \\[0, 2\\*\\*64\\), got {bad}"):
            SamplingParams(seed=bad)
    logits = mx.array([[0.0, 1.0, 2.0]])
    for edge in (0, 2**64 - 1):
        sample = make_sampler(SamplingParams(seed=edge))
        assert sample(logits).tolist() == make_sampler(SamplingParams(seed=edge))(logits).tolist()
