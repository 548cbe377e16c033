"""The `mlx-gptoss` command line: thin typer commands over the public API.

Each submodule owns one command group and exposes a `typer.Typer` named `app`. Nothing outside
this package imports it. Every error a user can cause — a `GptOssError` from the library, or a
usage error that click found (unknown option, value out of range) — is one `error: ...` line on
stderr and exit code 2. `mlx-gptoss --debug COMMAND ...` (or MLX_GPTOSS_DEBUG=1) keeps the
traceback instead; `--debug` is an option of the program, so a prompt that says "--debug" is
left alone. Help is click's plain layout: it fits 80 columns and shows flags without a metavar.
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
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
DEBUG_ENV = "MLX_GPTOSS_DEBUG"
_debug = {"on": False}


def _show_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"mlx-gptoss {__version__}")
        raise typer.Exit()


@app.callback()
def _program(
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error "
                               "(also MLX_GPTOSS_DEBUG=1); goes before the command."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                 help="Print the version and exit."),
) -> None:
    """Run OpenAI's gpt-oss models on MLX."""
    _debug["on"] = _debug["on"] or debug


def _register() -> None:
    """Import the command modules lazily, so `import mlx_gptoss` never pays for the CLI."""
    if getattr(_register, "done", False):
        return
    from . import harmony

    app.add_typer(harmony.app, name="harmony")
    # Top-level commands: each module defines `register(app: typer.Typer) -> None`.
    from . import bench, chat, convert, demo, fuse, generate, lora, serve

    for module in (demo, convert, generate, chat, bench, serve, lora, fuse):
        module.register(app)
    _register.done = True


def fail(message: str) -> None:
    """The CLI's one error style: `error: MESSAGE` on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """The program. `argv=None` means it runs as the process (the `mlx-gptoss` script): then it
    also owns the process's Ctrl-C handling (`interrupts.install`)."""
    if argv is None:
        from . import interrupts

        interrupts.install()  # first: before MLX, NumPy or BLAS start threads
    argv = list(sys.argv[1:] if argv is None else argv)
    _debug["on"] = os.environ.get(DEBUG_ENV) == "1"
    _register()
    try:
        code = app(args=argv, prog_name="mlx-gptoss", standalone_mode=False)
    except GptOssError as e:
        if _debug["on"]:
            raise
        fail(str(e))
    except typer.TyperException as e:  # click's usage errors (typer vendors click)
        message = e.format_message()
        if message.startswith("Usage:"):  # a bare `mlx-gptoss harmony`: its help, as asked
            print(message, file=sys.stderr)
            sys.exit(2)
        ctx = getattr(e, "ctx", None)
        hint = " (--debug goes before the command)" if "--debug" in message else ""
        see = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        fail(f"{message}{hint}{see}")
    except typer.Abort:  # Ctrl-C (click turns KeyboardInterrupt into Abort)
        print(file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
