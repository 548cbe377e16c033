"""`mlx-gptoss lora`: LoRA fine-tuning, with options familiar to `mlx_lm.lora` users.

Adapters are written in PEFT's format (they load in transformers + PEFT too); the progress is
one line per report in mlx-lm's style.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import GptOssError
from .generate import DTYPE, model_option


def lora(
    model: str = model_option(),
    data: Path = typer.Option(..., "--data", help="A JSONL file, or a directory with "
                              "train.jsonl (and valid.jsonl)."),
    adapter_path: Path = typer.Option(Path("adapters"), "--adapter-path",
                                      help="Where the adapter and checkpoints are written."),
    iters: int = typer.Option(1000, "--iters", help="Optimizer steps."),
    batch_size: int = typer.Option(4, "--batch-size", help="Samples per micro-batch."),
    grad_accumulation: int = typer.Option(1, "--grad-accumulation-steps",
                                          help="Micro-batches per optimizer step."),
    learning_rate: float = typer.Option(2e-4, "--learning-rate", help="Peak learning rate."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Warmup steps (default 3% of "
                                         "--iters); then cosine decay to 10% of the peak."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    rank: int = typer.Option(8, "--rank", help="LoRA rank r."),
    alpha: float = typer.Option(16.0, "--alpha", help="LoRA alpha (scale alpha / r, as PEFT)."),
    dropout: float = typer.Option(0.0, "--dropout", help="LoRA dropout (linear targets)."),
    targets: str = typer.Option("attention", "--targets", help="Comma list of q_proj, k_proj, "
                                "v_proj, o_proj, router, gate_up_proj, down_proj, or the groups "
                                "attention, experts, all."),
    num_layers: int = typer.Option(-1, "--num-layers", help="Adapt the last N layers (-1: all)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma list of layer indices "
                                         "instead of --num-layers (e.g. 7,15,23)."),
    max_seq_length: int = typer.Option(2048, "--max-seq-length", help="Tokens per sample."),
    overflow: str = typer.Option("truncate", "--overflow",
                                 help="Longer samples: truncate (with a warning) or drop."),
    mask: str = typer.Option("assistant", "--mask", help="Loss on the trained turn's "
                             "assistant tokens (assistant) or its final answer only (final)."),
    per_turn: bool = typer.Option(False, "--per-turn",
                                  help="One sample per assistant turn of multi-turn rows."),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint",
                                         help="Recompute activations in the backward pass."),
    val_data: Optional[Path] = typer.Option(None, "--val-data",
                                            help="Validation JSONL (default: valid.jsonl)."),
    val_batches: int = typer.Option(25, "--val-batches", help="-1: the whole validation set."),
    steps_per_report: int = typer.Option(10, "--steps-per-report"),
    steps_per_eval: int = typer.Option(200, "--steps-per-eval"),
    save_every: int = typer.Option(100, "--save-every", help="Checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue from the latest checkpoint in --adapter-path."),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from",
                                               help="Continue from this checkpoint directory."),
    loss_chunk: int = typer.Option(1024, "--loss-chunk",
                                   help="Positions per cross-entropy chunk."),
    seed: int = typer.Option(0, "--seed"),
    dtype: Optional[str] = DTYPE,
) -> None:
    """Fine-tune LoRA adapters on harmony conversations (OpenAI chat or harmony JSONL)."""
    import mlx.core as mx

    from ..hub import load
    from ..lora import LoraConfig, adapter_summary, apply_lora
    from ..train import TrainConfig, train
    from ..train_data import data_files, load_examples

    if layers is not None and num_layers != -1:
        raise GptOssError("give --layers or --num-layers, not both")
    train_file, valid_file = data_files(data)
    valid_file = val_data or valid_file
    net, tokenizer = load(model, dtype)
    n = len(net.layers)
    if layers is not None:
        try:
            chosen = tuple(int(x) for x in layers.split(",") if x.strip())
        except ValueError:
            raise GptOssError(f"--layers must be comma-separated integers, got {layers!r}") \
                from None
    elif num_layers == -1 or num_layers >= n:
        chosen = None
    elif num_layers < 1:
        raise GptOssError(f"--num-layers must be -1 or positive, got {num_layers}")
    else:
        chosen = tuple(range(n - num_layers, n))
    config = LoraConfig(rank=rank, alpha=alpha, dropout=dropout,
                        targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
                        layers=chosen)

    def warn(line: str) -> None:
        print(f"warning: {line}", file=sys.stderr)

    options = dict(mask=mask, per_turn=per_turn, max_seq_length=max_seq_length,
                   overflow=overflow, warn=warn)
    train_set = load_examples(train_file, tokenizer, **options)
    val_set = load_examples(valid_file, tokenizer, **options) if valid_file else []
    mx.random.seed(seed)  # the adapters' initial A
    apply_lora(net, config)
    print(f"Loaded {len(train_set)} training and {len(val_set)} validation samples; "
          f"{adapter_summary(net)}")
    cfg = TrainConfig(iters=iters, batch_size=batch_size, learning_rate=learning_rate,
                      warmup=warmup, weight_decay=weight_decay,
                      grad_accumulation=grad_accumulation, grad_checkpoint=grad_checkpoint,
                      steps_per_report=steps_per_report, steps_per_eval=steps_per_eval,
                      val_batches=val_batches, save_every=save_every, seed=seed,
                      loss_chunk=loss_chunk)
    try:
        train(net, train_set, adapter_path, cfg, val_set=val_set,
              resume=str(resume_from) if resume_from else resume, base_model=str(model),
              log=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint is kept", file=sys.stderr)
        raise typer.Exit(130) from None


def register(app: typer.Typer) -> None:
    app.command("lora")(lora)
