"""`mlx-gptoss chat`: a multi-turn REPL over `Chat`.

Line editing and history come from readline when stdin is a terminal. Ctrl-C during a reply
stops it and discards that turn (the session stays); Ctrl-C at the prompt clears the line;
Ctrl-D exits. Calls to functions from --tools are shown and their result is asked for.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..distributed import rank_zero_command
from ..errors import GptOssError
from .generate import (DEVELOPER, DTYPE, EFFORT, EFFORTS, JSON_SCHEMA, MAX_TOKENS, MAX_TOOL_ROUNDS,
                       MIN_P, PARALLEL, PYTHON, SEED, SHOW_REASONING, SYSTEM, TEMPERATURE, TOOLS,
                       TOP_K, TOP_P, Display, load_chat, model_option, run_turn)

HELP = """commands:
  /effort low|medium|high   reasoning effort
  /system TEXT              model identity line of the system message (empty: default)
  /developer TEXT           developer instructions (empty: none)
  /reset                    forget the conversation
  /save FILE                save the conversation (openai-harmony JSON); FILE is the rest
                            of the line, spaces included (quotes around it are optional)
  /load FILE                load a saved conversation
  /help                     this help;  Ctrl-C stops a reply;  Ctrl-D (or /quit) exits"""


def ask(prompt: str) -> str:
    """input() whose prompt stays off stdout unless stdout is the terminal (readline redraws)."""
    if sys.stdout.isatty():
        return input(prompt)
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return input()


def _ask_tool_result(call) -> str:
    print(f"[tool] the model calls {call.recipient} with {call.text()}", file=sys.stderr)
    try:
        return ask(f"result for {call.recipient}> ")
    except EOFError:
        return '{"error": "the user gave no result"}'


def _unquote(text: str) -> str:
    """A file name is the whole rest of the line; one pair of quotes around it is dropped."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def command(chat, line: str) -> bool:
    """Run a /command; False to quit."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("quit", "exit"):
        return False
    if name == "help":
        print(HELP, file=sys.stderr)
    elif name == "effort":
        if arg.lower() not in EFFORTS:
            raise GptOssError(f"/effort takes one of {', '.join(EFFORTS)}")
        from ..generate import parse_effort

        chat.reasoning_effort = parse_effort(arg)
        print(f"reasoning effort: {arg.lower()}", file=sys.stderr)
    elif name == "system":
        chat.system = arg or None
    elif name == "developer":
        chat.instructions = arg or None
    elif name == "reset":
        chat.reset()
        print("conversation cleared", file=sys.stderr)
    elif name in ("save", "load"):
        file_name = _unquote(arg)
        if not file_name:
            raise GptOssError(f"/{name} needs a file name")
        path = Path(file_name).expanduser()
        chat.save(path) if name == "save" else chat.load(path)
        print(f"{'saved' if name == 'save' else 'loaded'} {path}", file=sys.stderr)
    else:
        raise GptOssError(f"unknown command /{name} (try /help)")
    return True


def repl(chat, display: Display, stdin=None) -> None:
    stdin = stdin or sys.stdin
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print("mlx-gptoss chat: /help for commands, Ctrl-D to exit", file=sys.stderr)
    while True:
        try:
            line = ask(">>> ") if interactive else stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not interactive and line == "":
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            try:
                if not command(chat, line):
                    break
            except GptOssError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        try:
            run_turn(chat, line, display)
        except KeyboardInterrupt:
            display.answer_open = False
            print("\n[interrupted: this turn was discarded]", file=sys.stderr)


@rank_zero_command
def chat(
    model: str = model_option(),
    reasoning_effort: str = EFFORT,
    system: Optional[str] = SYSTEM,
    developer: Optional[str] = DEVELOPER,
    show_reasoning: bool = SHOW_REASONING,
    max_tokens: int = MAX_TOKENS,
    temperature: Optional[float] = TEMPERATURE,
    top_p: Optional[float] = TOP_P,
    top_k: Optional[int] = TOP_K,
    min_p: Optional[float] = MIN_P,
    seed: Optional[int] = SEED,
    tools: Optional[Path] = TOOLS,
    python: bool = PYTHON,
    max_tool_rounds: int = MAX_TOOL_ROUNDS,
    json_schema: Optional[Path] = JSON_SCHEMA,
    dtype: Optional[str] = DTYPE,
    parallel: str = PARALLEL,
    load_file: Optional[Path] = typer.Option(None, "--load", help="Start from a saved chat."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Print each prompt and the stats to stderr."),
) -> None:
    """Chat with the model (multi-turn, with history and tools)."""
    session = load_chat(model, dtype, effort=reasoning_effort, system=system, developer=developer,
                        tools=tools, python=python, temperature=temperature, top_p=top_p,
                        top_k=top_k, min_p=min_p, seed=seed, max_tokens=max_tokens,
                        max_tool_rounds=max_tool_rounds, on_tool_call=_ask_tool_result,
                        json_schema=json_schema, parallel=parallel)
    if load_file is not None:
        session.load(load_file)
    display = Display(session.tokenizer, show_reasoning=show_reasoning, verbose=verbose)
    try:
        repl(session, display)
    finally:
        session.close()


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
