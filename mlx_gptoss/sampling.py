"""One sampler: temperature, top-k, top-p, min-p and a seed, applied in transformers' order.

gpt-oss is meant to be sampled at temperature 1.0 and top-p 1.0 (OpenAI's recommendation); the
checkpoints' generation_config.json sets neither, so unset fields mean "off" here, not
transformers' implicit `top_k=50`. Temperature 0 (or `do_sample: false`) is greedy decoding.

The filters follow transformers' logits warpers (the oracle in the tests): top-k keeps every
token tied with the k-th, top-p drops the least likely tokens whose cumulative probability stays
within `1 - top_p`, min-p drops tokens below `min_p` times the most likely one; each keeps at
least one token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .config import GENERATION_CONFIG, load_generation_config
from .errors import ConfigError, GptOssError

Sampler = Callable[[mx.array], mx.array]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise GptOssError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GptOssError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GptOssError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise GptOssError(f"min-p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:  # mx.random.key's range
            raise GptOssError(f"seed must be in [0, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_overrides(self, **overrides) -> "SamplingParams":
        """A copy with the non-None `overrides` applied (CLI flags over the model's defaults)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | None) -> "SamplingParams":
        """Defaults from `generation_config.json` when the model directory has one."""
        fields = load_generation_config(model_dir).sampling_fields()
        try:
            return cls(**fields)
        except GptOssError as e:  # a value out of range: name the file it came from
            raise ConfigError(f"{Path(model_dir) / GENERATION_CONFIG}: {e}") from None


def filter_logits(logits: mx.array, params: SamplingParams) -> mx.array:
    """Temperature-scaled logits `[..., vocab]` with the filtered-out tokens at -inf."""
    logits = logits.astype(mx.float32) / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = mx.sort(logits, axis=-1)[..., vocab - params.top_k][..., None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if params.top_p < 1.0:
        order = mx.argsort(logits, axis=-1)  # ascending
        ascending = mx.take_along_axis(logits, order, axis=-1)
        cumulative = mx.cumsum(mx.softmax(ascending, axis=-1), axis=-1)
        drop = cumulative <= 1 - params.top_p
        drop[..., -1] = False
        logits = mx.put_along_axis(logits, order, mx.where(drop, -mx.inf, ascending), axis=-1)
    if params.min_p > 0.0:
        top = mx.max(logits, axis=-1, keepdims=True)
        # p < min_p * p_max  <=>  logit < logit_max + log(min_p)
        logits = mx.where(logits < top + mx.log(mx.array(params.min_p)), -mx.inf, logits)
    return logits


def make_sampler(params: SamplingParams) -> Sampler:
    """`sampler(logits[..., vocab]) -> token ids[...]`; a seed makes the sequence reproducible."""
    if params.greedy:
        return lambda logits: mx.argmax(logits, axis=-1)
    key = [mx.random.key(params.seed) if params.seed is not None else None]

    def sample(logits: mx.array) -> mx.array:
        step_key = None
        if key[0] is not None:
            key[0], step_key = mx.random.split(key[0])
        return mx.random.categorical(filter_logits(logits, params), axis=-1, key=step_key)

    return sample
