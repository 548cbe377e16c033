"""`mlx-gptoss bench`: this project against mlx-lm on the same synthetic 20b-width weights."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import GptOssError


def _sizes(text: str, option: str = "--sizes") -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise GptOssError(f"{option} wants positive integers separated by commas, got {text!r}")
    return sizes


def bench(
    layers: int = typer.Option(2, "--layers", min=1, help="Transformer blocks (real widths)."),
    sizes: str = typer.Option("128,1024,4096", "--sizes", help="Prompt lengths to prefill."),
    decode_tokens: Optional[int] = typer.Option(
        None, "--decode", min=1, help="Tokens decoded per size (default 16; --overhead 64)."),
    repeats: Optional[int] = typer.Option(
        None, "--repeats", min=1, help="Median over this many runs (default 3; --overhead 5 "
        "per process)."),
    second_turn: int = typer.Option(64, "--second-turn", min=1,
                                    help="New tokens in the second chat turn."),
    history: Optional[int] = typer.Option(None, "--history", min=1,
                                          help="First-turn tokens (default: largest size)."),
    dtype: Optional[str] = typer.Option(None, "--dtype",
                                        help="Our compute dtype (default: per device)."),
    chunk: Optional[int] = typer.Option(None, "--chunk", min=1,
                                        help="Our prefill chunk (default: the model's)."),
    mlx_lm_dtype: Optional[str] = typer.Option(None, "--mlx-lm-dtype",
                                               help="Cast mlx-lm's weights (default: as loaded)."),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Also run mlx-lm."),
    breakdown: bool = typer.Option(True, "--breakdown/--no-breakdown",
                                   help="Time decode by component."),
    cache_dir: Path = typer.Option(Path(".bench-cache"), "--cache-dir",
                                   help="Where the synthetic checkpoint is kept."),
    out: Path = typer.Option(Path("benchmarks/results/latest.json"), "--out",
                             help="JSON results file."),
    overhead: bool = typer.Option(
        False, "--overhead", help="Per-token decode overhead instead: tiny widths at --depths "
        "layers, one fresh process per sample (--processes), ours in the default dtype and "
        "bf16 (or --dtype) vs mlx-lm."),
    depths: str = typer.Option("24,36", "--depths", help="--overhead: layer counts."),
    processes: int = typer.Option(3, "--processes", min=1,
                                  help="--overhead: fresh processes per variant and depth."),
    rows: str = typer.Option("1,2,4,8", "--rows",
                             help="--overhead: batch sizes of the batched step ('none': skip)."),
) -> None:
    """Prefill/decode speed, memory, load time and prompt-cache TTFT, side by side."""
    from ..benchmark import (
        OverheadSettings,
        Settings,
        format_overhead_table,
        format_table,
        run,
        run_overhead,
        write_results,
    )
    from ..loading import resolve_dtype

    for name in (dtype, mlx_lm_dtype):  # before minutes of checkpoint writing, not after
        if name is not None:
            resolve_dtype(name)
    if overhead:
        osettings = OverheadSettings(
            depths=_sizes(depths, "--depths"), decode_tokens=decode_tokens or 64,
            repeats=repeats or 5, processes=processes,
            dtypes=(dtype,) if dtype is not None else OverheadSettings.dtypes,
            compare=compare, cache_dir=cache_dir,
            rows=() if rows.strip().lower() == "none" else _sizes(rows, "--rows"))
        results = run_overhead(osettings, log=lambda line: typer.echo(line, err=True))
        write_results(results, out)
        typer.echo(format_overhead_table(results))
        typer.echo(f"\nresults written to {out}")
        return
    settings = Settings(layers=layers, prompt_sizes=_sizes(sizes),
                        decode_tokens=decode_tokens or 16,
                        repeats=repeats or 3, second_turn_tokens=second_turn, history=history,
                        dtype=dtype, chunk=chunk,
                        mlx_lm_dtype=mlx_lm_dtype, compare=compare, breakdown=breakdown,
                        cache_dir=cache_dir)
    results = run(settings, log=lambda line: typer.echo(line, err=True))
    write_results(results, out)
    typer.echo(format_table(results))
    typer.echo(f"\nresults written to {out}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
