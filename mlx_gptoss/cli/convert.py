"""`mlx-gptoss convert` and `mlx-gptoss verify`: thin wrappers over `converter` and `verify`."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def convert(
    hf_path: Path = typer.Option(..., "--hf-path", help="Source checkpoint directory "
                                 "(Hugging Face hub layout, OpenAI original/, or dense export)."),
    mlx_path: Path = typer.Option(..., "--mlx-path", help="Destination model directory."),
    quantize: bool = typer.Option(False, "--quantize", "-q",
                                  help="Quantize attention, embeddings and lm_head."),
    q_mode: str = typer.Option("affine", "--q-mode", help="affine, mxfp8, mxfp4 or nvfp4."),
    q_bits: Optional[int] = typer.Option(None, "--q-bits", help="Bits per weight "
                                         "(default per mode: affine 4)."),
    q_group_size: Optional[int] = typer.Option(None, "--q-group-size",
                                               help="Group size (default per mode: affine 64)."),
    quantize_router: bool = typer.Option(False, "--quantize-router",
                                         help="Quantize the router too (needs --quantize)."),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="o200k_base.tiktoken to copy "
                                         "(default: found offline, SHA-256 checked)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty destination."),
) -> None:
    """Convert a gpt-oss checkpoint into a self-contained MLX model directory."""
    from ..converter import ConversionError, convert as run, quantization_config

    if not quantize and (quantize_router or q_bits or q_group_size or q_mode != "affine"):
        raise ConversionError("--q-mode/--q-bits/--q-group-size/--quantize-router need "
                              "--quantize")
    q = quantization_config(q_mode, q_bits, q_group_size, quantize_router) if quantize else None
    try:
        report = run(hf_path, mlx_path, quantization=q, force=force, vocab=vocab, log=print)
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {mlx_path}", file=sys.stderr)
        raise typer.Exit(130) from None
    print(report.summary())


def verify(
    model: Path = typer.Option(..., "--model", help="Converted model directory."),
    against: Optional[Path] = typer.Option(None, "--against",
                                           help="Source checkpoint to compare weights with."),
) -> None:
    """Check a converted directory's structure, and with --against, a sample of its weights."""
    from ..verify import verify as run

    print(run(model, against).summary())


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
    app.command("verify")(verify)
