"""`mlx-gptoss chat`: a multi-turn REPL over `Chat`.

Line editing and history (kept across sessions in the cache directory, or `$MLX_GPTOSS_HISTORY`;
set it empty for none) come from readline when stdin is a terminal. A message spans several
lines when pasted (bracketed paste) or written between `\"\"\"` lines, as in ollama. Ctrl-C during
a reply stops it and discards that turn (the session stays); Ctrl-C at the prompt clears the
line; Ctrl-D exits. Calls to functions from --tools stream like any message, then their result
is asked for.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from ..distributed import rank_zero_command
from ..env import user_cache_dir
from ..errors import GptOssError
from . import interrupts
from .generate import (
    ADAPTER,
    BROWSER,
    BROWSER_ALLOW_PRIVATE,
    BROWSER_SEARCH,
    DEVELOPER,
    DTYPE,
    EFFORT,
    EFFORTS,
    JSON_SCHEMA,
    KV_BITS,
    MAX_REASONING_TOKENS,
    MAX_TOKENS,
    MAX_TOOL_ROUNDS,
    MIN_P,
    PARALLEL,
    PIPELINE_MEMORY,
    PYTHON,
    PYTHON_AUTO,
    PYTHON_UNSAFE,
    SEED,
    SHOW_REASONING,
    STATS,
    SYSTEM,
    TEMPERATURE,
    TOOLS,
    TOP_K,
    TOP_P,
    VERBOSE,
    Display,
    load_chat,
    model_option,
    run_turn,
)

HELP = """commands:
  /effort [low|medium|high] reasoning effort (alone: show it)
  /system [TEXT]            model identity line of the system message (empty: default)
  /developer [TEXT]         developer instructions (empty: none)
  /reset                    forget the conversation
  /save FILE                save the conversation and its settings (openai-harmony JSON);
                            FILE is the rest of the line, spaces included (quotes optional)
  /load FILE                load a saved conversation and its settings
  /help                     this help;  Ctrl-C stops a reply;  Ctrl-D (or /quit) exits
messages:
  \"\"\"                       alone on a line: the lines up to the next \"\"\" are one
                            message (text may follow the opening or precede the closing)
  //TEXT                    a message that starts with "/" (sends "/TEXT")
  pasted text is one message (in terminals with bracketed paste)"""
MULTILINE = '"""'
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"
HISTORY_ENV = "MLX_GPTOSS_HISTORY"
HISTORY_LENGTH = 1000


def ask(prompt: str) -> str:
    """input() whose prompt stays off stdout unless stdout is the terminal (readline redraws).
    Ctrl-C reaches it as a plain signal (see `interrupts.deliverable`)."""
    with interrupts.deliverable():
        if sys.stdout.isatty():
            return input(prompt)
        sys.stderr.write(prompt)
        sys.stderr.flush()
        return input()


def _ask_to_run(code: str) -> bool:
    """Before each python run (unless --python-auto): show the code, run it only on "y"."""
    print(f"[python] the model wants to run:\n{code}", file=sys.stderr)
    try:
        return ask("run it? [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _ask_tool_result(call) -> str:
    """The call itself was just streamed (`[commentary] -> functions.f: {...}`): only ask."""
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
        if arg:
            if arg.lower() not in EFFORTS:
                raise GptOssError(f"/effort takes one of {', '.join(EFFORTS)}")
            from ..prompts import parse_effort

            chat.reasoning_effort = parse_effort(arg)
        effort = chat.reasoning_effort.value.lower() if chat.reasoning_effort else "none"
        print(f"reasoning effort: {effort}", file=sys.stderr)
    elif name == "system":
        chat.system = arg or None
        print(f"system identity: {chat.system or '(default)'}", file=sys.stderr)
    elif name == "developer":
        chat.instructions = arg or None
        print(f"developer instructions: {chat.instructions or '(none)'}", file=sys.stderr)
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


def history_file() -> Path | None:
    """Where readline keeps the prompt history between sessions (None: `$MLX_GPTOSS_HISTORY`
    is set empty)."""
    if HISTORY_ENV in os.environ:
        return Path(os.environ[HISTORY_ENV]).expanduser() if os.environ[HISTORY_ENV] else None
    return user_cache_dir() / "chat-history"


def _start_readline() -> Callable[[], None]:
    """Line editing, bracketed paste and the saved history; returns what saves it at exit."""
    try:
        import readline
    except ImportError:
        return lambda: None
    readline.parse_and_bind("set enable-bracketed-paste on")  # a paste arrives as one line
    path = history_file()
    if path is None:
        return lambda: None
    try:
        readline.read_history_file(path)
    except OSError:  # none yet, or unreadable: start empty
        pass
    readline.set_history_length(HISTORY_LENGTH)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError as e:
            print(f"warning: chat history not saved to {path}: {e.strerror}", file=sys.stderr)

    return save


def read_message(first: str, next_line: Callable[[], str]) -> str | None:
    """The whole message that begins with line `first`: a bracketed paste (the markers that
    a terminal without readline's support passes through) or a \"\"\" block continue on the
    lines `next_line()` returns; end of input closes an open block. None: `first` is an
    ordinary line (a message or a /command)."""
    if first.startswith(PASTE_START):
        text = first[len(PASTE_START):]
        while PASTE_END not in text:
            more = next_line()
            if more == "":
                break
            text += more
        return text.replace(PASTE_END, "").strip("\n")
    if first.strip().startswith(MULTILINE):
        text = first.strip()[len(MULTILINE):]
        lines = [] if not text else [text]
        if text.endswith(MULTILINE):  # triple quotes around one line
            return text[:-len(MULTILINE)]
        while True:
            more = next_line()
            if more == "":
                break
            more = more.rstrip("\n")
            if more.rstrip().endswith(MULTILINE):
                lines.append(more.rstrip()[:-len(MULTILINE)])
                break
            lines.append(more)
        return "\n".join(lines).strip("\n")
    return None


def repl(chat, display: Display, stdin=None) -> None:
    stdin = stdin or sys.stdin
    interactive = stdin.isatty()
    save_history = lambda: None  # noqa: E731
    if interactive:
        save_history = _start_readline()
        print("mlx-gptoss chat: /help for commands, Ctrl-D to exit", file=sys.stderr)

    def next_line() -> str:
        """The next raw line, "" at end of input."""
        if not interactive:
            return stdin.readline()
        try:
            return ask("... ") + "\n"
        except EOFError:
            return ""

    try:
        _loop(chat, display, stdin, interactive, next_line)
    finally:
        save_history()


def _loop(chat, display: Display, stdin, interactive: bool, next_line) -> None:
    while True:
        try:
            line = ask(">>> ") if interactive else stdin.readline()
        except EOFError:
            print(file=sys.stderr)  # the shell prompt starts on a line of its own
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not interactive and line == "":
            break
        try:
            text = read_message(line, next_line)
        except KeyboardInterrupt:  # Ctrl-C inside a block drops the block
            print(file=sys.stderr)
            continue
        if text is None:
            text = line.strip()
            if text.startswith("/") and not text.startswith("//"):
                try:
                    if not command(chat, text):
                        break
                except GptOssError as e:
                    print(f"error: {e}", file=sys.stderr)
                continue
            if text.startswith("//"):
                text = text[1:]
        if not text.strip():
            continue
        try:
            run_turn(chat, text, display)
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
    python_auto: bool = PYTHON_AUTO,
    python_unsafe: bool = PYTHON_UNSAFE,
    browser: bool = BROWSER,
    browser_search: Optional[str] = BROWSER_SEARCH,
    browser_allow_private: bool = BROWSER_ALLOW_PRIVATE,
    max_tool_rounds: int = MAX_TOOL_ROUNDS,
    json_schema: Optional[Path] = JSON_SCHEMA,
    max_reasoning_tokens: Optional[int] = MAX_REASONING_TOKENS,
    dtype: Optional[str] = DTYPE,
    adapter: Optional[Path] = ADAPTER,
    parallel: str = PARALLEL,
    pipeline_memory: Optional[str] = PIPELINE_MEMORY,
    kv_bits: Optional[int] = KV_BITS,
    load_file: Optional[Path] = typer.Option(None, "--load", help="Start from a saved chat."),
    stats: Optional[bool] = STATS,
    verbose: bool = VERBOSE,
) -> None:
    """Chat with the model (multi-turn, with history and tools)."""
    session = load_chat(model, dtype, effort=reasoning_effort, system=system, developer=developer,
                        tools=tools, python=python, temperature=temperature, top_p=top_p,
                        top_k=top_k, min_p=min_p, seed=seed, max_tokens=max_tokens,
                        max_tool_rounds=max_tool_rounds, on_tool_call=_ask_tool_result,
                        json_schema=json_schema, python_unsafe=python_unsafe,
                        confirm_code=None if python_auto else _ask_to_run,
                        browser=browser, browser_search=browser_search,
                        browser_allow_private=browser_allow_private,
                        max_reasoning_tokens=max_reasoning_tokens, adapter=adapter,
                        parallel=parallel, pipeline_memory=pipeline_memory,
                        kv_bits=kv_bits)
    if load_file is not None:
        session.load(load_file)
    display = Display(session.tokenizer, show_reasoning=show_reasoning, verbose=verbose,
                      stats=stats, hold_answer=json_schema is not None)
    try:
        repl(session, display)
    finally:
        session.close()


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
