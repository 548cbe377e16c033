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
    force: bool = typer.Option(False, "--force", help="Replace a non-empty destination."),
) -> None:
    """Merge an adapter's attention/router updates into the weights (experts stay unfused)."""
    from ..fuse import fuse as run
    from ..hub import resolve_model

    source = resolve_model(model, log=print)
    try:
        report = run(source, adapter, mlx_path, dtype=dtype, force=force, log=print)
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {mlx_path}", file=sys.stderr)
        raise typer.Exit(130) from None
    print(report.summary())


def register(app: typer.Typer) -> None:
    app.command("fuse")(fuse)
