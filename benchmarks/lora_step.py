"""Training tokens/s and peak memory of one LoRA step, this project vs `mlx_lm.lora`.

`python benchmarks/lora_step.py [--seq 512 2048] [--layers 2] [--steps 3]`

Both train rank-8 adapters (PEFT scale alpha/r = 2, mlx-lm `scale` 2.0) on every layer's
attention, router and experts (mlx-lm's default key set for gpt_oss) over the same synthetic
gpt-oss-20b-width weights (`mlx_gptoss.benchmark.model_dirs`: the hub-layout directory mlx-lm
loads, our conversion of it), one sequence of `--seq` tokens per step with the loss on every
token, AdamW. mlx-lm runs its own trainer's step: `default_loss` (full-vocabulary logits) and
the `mx.compile`d update of `mlx_lm.tuner.trainer.train`; ours runs `train.loss_and_grad`
(chunked cross-entropy) and the same optimizer. Each step is timed after `--warmup` steps;
figures are medians (`step_cpu_s`: CPU seconds of the process, all threads, the fairer
figure on a shared machine). Peak memory is MLX's allocator peak during the timed steps, weights
included; `max_rss_gb` is the process's peak resident memory so far (loading included, and
whatever numpy allocates: ours multiplies the frozen head and attention through numpy's BLAS on
the CPU, `mlx_gptoss/blas.py`), the figure to compare when each implementation runs alone
(`--only`). Results: one JSON line per (implementation, seq) on stdout and in `--out`.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402

from mlx_gptoss.benchmark import Settings, machine, model_dirs  # noqa: E402

RANK, SCALE = 8, 2.0


def ours_step(converted: Path, dtype: str | None, grad_checkpoint: bool):
    from mlx_gptoss.loading import load_model
    from mlx_gptoss.lora import LoraConfig, apply_lora, trainable_count
    from mlx_gptoss.train import Batch, loss_and_grad

    model, _ = load_model(converted, dtype)
    apply_lora(model, LoraConfig(rank=RANK, alpha=RANK * SCALE, targets=("all",)))
    model.train()
    optimizer = optim.AdamW(learning_rate=1e-5, weight_decay=0.0)

    def step(tokens: mx.array) -> float:
        t = tokens.shape[1] - 1
        batch = Batch(tokens[:, :-1], mx.arange(t, dtype=mx.int32), tokens[0, 1:])
        loss, grads, _ = loss_and_grad(model, [batch], grad_checkpoint=grad_checkpoint)
        optimizer.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), optimizer.state)
        return loss.item()

    return model, step, trainable_count(model)


def mlx_lm_step(source: Path, dtype: str | None, grad_checkpoint: bool):
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint as checkpoint_layers
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(source, lazy=True)
    if dtype is not None:
        from mlx_gptoss.loading import resolve_dtype

        target = resolve_dtype(dtype)
        model.apply(lambda v: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v)
    mx.eval(model.parameters())
    model.freeze()
    linear_to_lora_layers(model, len(model.layers),
                          {"rank": RANK, "scale": SCALE, "dropout": 0.0})
    if grad_checkpoint:
        checkpoint_layers(model.layers[0])
    model.train()
    optimizer = optim.AdamW(learning_rate=1e-5, weight_decay=0.0)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled(batch, lengths):  # as mlx_lm.tuner.trainer.train's step, one micro-batch
        (loss, toks), grad = loss_value_and_grad(model, batch, lengths)
        optimizer.update(model, grad)
        return loss, toks

    def step(tokens: mx.array) -> float:
        lengths = mx.array([[1, tokens.shape[1] - 1]])  # every target position trained
        loss, _ = compiled(tokens, lengths)
        mx.eval(state, loss)
        return loss.item()

    count = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return model, step, count


def measure(name: str, build, seq: int, steps: int, warmup: int, vocab: int) -> dict:
    model, step, trainable = build()
    tokens = mx.random.randint(0, vocab, (1, seq + 1), key=mx.random.key(seq))
    for _ in range(warmup):
        step(tokens)
    mx.reset_peak_memory()
    times, cpu_times, losses = [], [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step(tokens))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    seconds = statistics.median(times)
    result = {"impl": name, "seq": seq, "step_s": round(seconds, 3),
              # CPU seconds of all the process's threads: on a shared machine, the wall time
              # mostly measures the other jobs' load.
              "step_cpu_s": round(statistics.median(cpu_times), 3),
              "tokens_per_s": round(seq / seconds, 2),
              "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3),
              # Linux reports kilobytes.
              "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
              "trainable": trainable, "loss": round(losses[-1], 4), "steps": steps}
    del model, step
    gc.collect()
    mx.clear_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="ours (default: per-device policy)")
    parser.add_argument("--mlx-lm-dtype", default=None, help="default: the checkpoint's bf16")
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--only", choices=["mlx-gptoss", "mlx-lm"], default=None)
    parser.add_argument("--vocab", type=int, default=None,
                        help="a smaller vocabulary (default 201,088): per-layer figures from "
                        "runs at several --layers without the head's cost")
    parser.add_argument("--cache-dir", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    settings = Settings(layers=args.layers, cache_dir=args.cache_dir)
    if args.vocab is not None:
        settings.widths["vocab_size"] = args.vocab
    source, converted = model_dirs(settings)
    vocab = settings.widths["vocab_size"]
    results = []
    for seq in args.seq:
        impls = [("mlx-gptoss", partial(ours_step, converted, args.dtype, args.grad_checkpoint)),
                 ("mlx-lm", partial(mlx_lm_step, source, args.mlx_lm_dtype,
                                    args.grad_checkpoint))]
        for name, build in impls:
            if args.only not in (None, name):
                continue
            result = measure(name, build, seq, args.steps, args.warmup, vocab)
            result.update(layers=args.layers, grad_checkpoint=args.grad_checkpoint,
                          dtype=args.dtype if name == "mlx-gptoss" else args.mlx_lm_dtype)
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
