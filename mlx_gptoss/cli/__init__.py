"""The `mlx-gptoss` command line: thin typer commands over the public API.

Each submodule owns one command group and exposes a `typer.Typer` named `app`. Nothing outside
this package imports it. Errors derived from `GptOssError` become one line on stderr and exit
code 2; `--debug` (or MLX_GPTOSS_DEBUG=1) keeps the traceback.
"""
from __future__ import annotations

import os
import sys

import typer

from ..errors import GptOssError

app = typer.Typer(
    name="mlx-gptoss",
    help="Run OpenAI's gpt-oss models on MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    """Import the command modules lazily, so `import mlx_gptoss` never pays for the CLI."""
    from . import harmony

    app.add_typer(harmony.app, name="harmony")
    # Top-level commands: each module defines `register(app: typer.Typer) -> None`.
    # (convert/verify, generate, chat and bench add themselves to this list.)
    from . import bench, chat, convert, demo, fuse, generate, lora

    for module in (demo, convert, generate, chat, bench, lora, fuse):
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MLX_GPTOSS_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    _register()
    try:
        app(args=argv, prog_name="mlx-gptoss", standalone_mode=True)
    except GptOssError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
