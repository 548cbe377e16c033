"""One rank of the distributed tests (run by tests/test_distributed.py, one process per rank).

`python tests/distributed_rank.py MODEL PARALLEL OUT.json [MEMORY]` loads this rank's share
(MEMORY: `--pipeline-memory`), then
writes: the float32 logits of a prompt (full sequence), greedy and seeded tokens over two
generations that share a prompt prefix (the second reuses the prompt cache), its resident
expert bytes and its load line. `single` as PARALLEL runs the same on one process.
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_gptoss import distributed
from mlx_gptoss.cache import PromptCache
from mlx_gptoss.generate import GenerationStats, generate_tokens
from mlx_gptoss.engine import batch_generate
from mlx_gptoss.errors import DistributedError
from mlx_gptoss.loading import load_model, load_tokenizer_for
from mlx_gptoss.sampling import SamplingParams, make_sampler

# Longer than the sliding window (8), and 20 x 4 (token, expert) pairs: the sorted expert path.
PROMPT = [3, 17, 42, 99, 7, 250, 11, 64, 128, 5, 19, 201, 33, 77, 90, 91, 1, 2, 200, 150]
FOLLOW_UP = [60, 61, 62]
STEPS = 6
SEEDED = SamplingParams(temperature=1.0, seed=1234)
REQUEST = {"prompt": PROMPT, "sampling": {"temperature": 0.7}, "text": "héllo"}


def generations(model, params: SamplingParams) -> dict:
    """Two calls through one prompt cache: the prompt, then prompt + answer + follow-up."""
    cache = PromptCache.for_model(model)
    sampler = make_sampler(params)
    first = list(generate_tokens(model, PROMPT, sampler=sampler, max_tokens=STEPS,
                                 prompt_cache=cache))
    stats = GenerationStats()
    second = list(generate_tokens(model, PROMPT + first + FOLLOW_UP, sampler=sampler,
                                  max_tokens=STEPS, prompt_cache=cache, stats=stats))
    return {"tokens": [first, second], "cached": stats.cached_tokens}


def main(model_dir: str, parallel: str, out: str, memory: str | None = None) -> None:
    lines: list[str] = []
    if parallel == "single":
        model, _ = load_model(model_dir, "float32")
        tokenizer = load_tokenizer_for(Path(model_dir))
        rank = 0
    else:
        model, tokenizer = distributed.load(model_dir, "float32", parallel=parallel,
                                            pipeline_memory=memory, log=lines.append)
        rank = mx.distributed.init().rank()
    gc.collect()
    resident = mx.get_active_memory()  # every buffer this rank holds, views' owners included
    with distributed.rank_zero_output():
        logits = model(mx.array([PROMPT]))
        mx.eval(logits)
        greedy = generations(model, SamplingParams(temperature=0.0))
        seeded = generations(model, SEEDED)
        unseeded = generations(model, SamplingParams(temperature=1.0))
        group = mx.distributed.init()
        request = distributed.broadcast_json(REQUEST if rank == 0 else None, group)
        synced = generate_tokens(model, PROMPT, max_tokens=STEPS, sampler=distributed.
                                 synchronized_sampler(make_sampler(SEEDED), group))
        synced = list(synced)
        try:  # the batched engine: rows of different lengths in one step
            batch = [r.tokens for r in batch_generate(model, tokenizer, [PROMPT, PROMPT[:9]],
                                                      max_tokens=STEPS, temperature=0)]
        except DistributedError as e:
            batch = str(e)
    expert_bytes = sum(v.nbytes for k, v in _parameters(model) if ".mlp.experts." in k)
    np.save(out + ".logits.npy", np.array(logits))
    with open(out, "w") as f:
        json.dump({"rank": rank, "resident_bytes": resident,
                   "parameter_bytes": sum(v.nbytes for _, v in _parameters(model)),
                   "greedy": greedy, "request": request, "synced": synced, "batch": batch, "seeded": seeded, "unseeded": unseeded,
                   "expert_bytes": expert_bytes, "load_line": lines}, f)


def _parameters(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


if __name__ == "__main__":
    main(*sys.argv[1:5])
