"""A directory written by this project's converter: tensors already carry the model's names
and layouts, so the mapping is the identity and validation compares with the model itself."""
from __future__ import annotations

from typing import Iterator, Mapping

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config import ModelConfig
from ..safetensors_io import DTYPE_NAMES, TensorInfo
from .hf import FLOAT, Spec, check_against


def expected_tensors(cfg: ModelConfig) -> dict[str, Spec]:
    from ..loading import build_model  # the model's own parameters are the specification

    model = build_model(cfg)
    out: dict[str, Spec] = {}
    for name, value in tree_flatten(model.parameters()):
        dtype = DTYPE_NAMES[value.dtype]
        out[name] = (tuple(value.shape), FLOAT if dtype in FLOAT else frozenset({dtype}))
    return out


def validate(cfg: ModelConfig, infos: Mapping[str, TensorInfo]) -> None:
    check_against(expected_tensors(cfg), infos)


def to_canonical(cfg: ModelConfig, tensors) -> Iterator[tuple[str, mx.array]]:
    for name in tensors.infos:
        yield name, tensors[name]
