"""`mlx-gptoss fuse`: merge a LoRA adapter into a converted model directory."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .generate import model_option


def fuse(
    model: str = model_option(),
    adapter: Path = typer.Option(..., "--adapter", "--adapter-path",
                                 help="LoRA adapter directory (PEFT format)."),
    mlx_path: Path = typer.Option(..., "--mlx-path", help="Destination model directory."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="dtype of the merged tensors "
                                        "(default: the checkpoint's; float32 is exact)."),
    experts: Optional[str] = typer.Option(
        None, "--experts", help="Also merge an expert adapter, writing every expert as bf16 "
        "(float32: exact), 8bit (affine) or mxfp4 (warned: loses typical updates). Default: "
        "experts stay MXFP4 and an expert adapter is refused (use it unfused, --adapter)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty destination."),
) -> None:
    """Merge an adapter into the weights: attention/router always, experts with --experts."""
    from ..fuse import fuse as run
    from ..hub import resolve_model

    def log(line: str) -> None:
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)

    source = resolve_model(model, log=print)
    try:
        report = run(source, adapter, mlx_path, dtype=dtype, experts=experts, force=force,
                     log=log)
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {mlx_path}", file=sys.stderr)
        raise typer.Exit(130) from None
    print(report.summary())


def register(app: typer.Typer) -> None:
    app.command("fuse")(fuse)
