"""`mlx-gptoss generate`: one prompt, one answer.

The final answer goes to stdout; reasoning, tool traffic, the prompt (`--verbose`) and the stats
go to stderr, so `answer=$(mlx-gptoss generate ...)` captures the answer alone. `--json` prints
one JSON event per line on stdout instead. The display helpers here are shared with `chat`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, TextIO

import typer

from ..distributed import rank_zero_command
from ..errors import GptOssError

EFFORTS = ("low", "medium", "high")
DIM, RESET = "\x1b[2m", "\x1b[0m"


# --------------------------------------------------------------------------- options


def model_option() -> Any:
    return typer.Option(..., "--model", "-m",
                        help="Model directory, or a Hugging Face repo id (openai/gpt-oss-20b).")


def load_chat(model: str, dtype: Optional[str], *, effort: str, system: Optional[str],
              developer: Optional[str], tools: Optional[Path], python: bool,
              temperature: Optional[float], top_p: Optional[float], top_k: Optional[int],
              min_p: Optional[float], seed: Optional[int], max_tokens: int,
              max_tool_rounds: int, on_tool_call=None, json_schema: Optional[Path] = None,
              parallel: str = "auto"):
    """Everything both commands need: loaded model, tools, sampling, a `Chat`."""
    from ..chat import Chat
    from ..constrained import load_json_schema
    from ..distributed import load
    from ..tools.functions import load_tools_file

    if effort.lower() not in EFFORTS:
        raise GptOssError(f"--reasoning-effort must be one of {', '.join(EFFORTS)}, got {effort!r}")
    functions = load_tools_file(tools) if tools is not None else []
    response_format = load_json_schema(json_schema) if json_schema is not None else None
    net, tokenizer = load(model, dtype, parallel=parallel)
    sampling = net.sampling_defaults.with_overrides(temperature=temperature, top_p=top_p,
                                                    top_k=top_k, min_p=min_p, seed=seed)
    return Chat(net, tokenizer, instructions=developer, system=system, reasoning_effort=effort,
                tools=functions, python=python, on_tool_call=on_tool_call,
                max_tool_rounds=max_tool_rounds, max_tokens=max_tokens, sampling=sampling,
                response_format=response_format)


# --------------------------------------------------------------------------- shared options
# `generate` and `chat` take the same session options; each is defined once here.
EFFORT = typer.Option("medium", "--reasoning-effort", "-r", help="low, medium or high.")
SYSTEM = typer.Option(None, "--system", help="Model identity line of the system message.")
DEVELOPER = typer.Option(None, "--developer", help="Developer instructions.")
SHOW_REASONING = typer.Option(True, "--show-reasoning/--hide-reasoning",
                              help="Stream the analysis channel to stderr.")
MAX_TOKENS = typer.Option(4096, "--max-tokens", help="Tokens per generation.")
TEMPERATURE = typer.Option(None, "--temperature", "--temp",
                           help="Default: generation_config, else 1.0.")
TOP_P = typer.Option(None, "--top-p", help="Default 1.0 (off).")
TOP_K = typer.Option(None, "--top-k", help="Default 0 (off).")
MIN_P = typer.Option(None, "--min-p", help="Default 0.0 (off).")
SEED = typer.Option(None, "--seed", help="Make sampling reproducible.")
TOOLS = typer.Option(None, "--tools", help="JSON list of OpenAI-style function tools.")
PYTHON = typer.Option(False, "--python", help=(
    "Let the model run Python in a separate, resource-limited process "
    "(not a security sandbox: its code can read and write your files)."))
MAX_TOOL_ROUNDS = typer.Option(8, "--max-tool-rounds", help="Tool calls per turn.")
JSON_SCHEMA = typer.Option(None, "--json-schema",
                           help="JSON Schema file: every answer is JSON that validates against it.")
PARALLEL = typer.Option("auto", "--parallel", help=(
    "Under mlx.launch: expert, pipeline or auto (expert unless there are more ranks than "
    "experts); counts per rank may follow, e.g. pipeline:10,14. See docs/distributed.md."))
DTYPE = typer.Option(None, "--dtype",
                     help="Compute dtype (bfloat16, float32...). Default: float32 activations "
                          "on the CPU backend, bfloat16 on a GPU.")


# --------------------------------------------------------------------------- display


class Display:
    """Streams a chat's events: the answer to `out`, the rest to `err` (dimmed on a TTY)."""

    def __init__(self, tokenizer, *, show_reasoning: bool = True, as_json: bool = False,
                 verbose: bool = False, out: TextIO | None = None, err: TextIO | None = None):
        self.tok = tokenizer
        self.show_reasoning = show_reasoning
        self.as_json = as_json
        self.verbose = verbose
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.dim = self.err.isatty()
        self.channel: str | None = None
        self.recipient: str | None = None
        self.answer_open = False

    def _err(self, text: str, dim: bool = False) -> None:
        if dim and self.dim:
            text = f"{DIM}{text}{RESET}"
        self.err.write(text)
        self.err.flush()

    def show(self, event: Any) -> None:
        from ..chat import Reply, ToolResult
        from ..generate import GenerationResult, event_to_dict
        from ..harmony import MessageEnd, MessageStart, TextDelta

        if self.as_json:
            if isinstance(event, ToolResult):
                data = {"type": "tool_result", "recipient": event.call.recipient,
                        "output": event.output}
            elif isinstance(event, Reply):
                data = {"type": "reply", "stop": event.stop, "text": event.text}
            else:
                data = event_to_dict(event, self.channel)
            if isinstance(event, MessageStart):
                self.channel = event.channel
            self.out.write(json.dumps(data, ensure_ascii=False) + "\n")
            self.out.flush()
            return
        if isinstance(event, MessageStart):
            self.channel, self.recipient = event.channel, event.recipient
            if self.recipient:
                self._err(f"[{event.channel or 'call'}] -> {self.recipient}: ")
            elif self.channel == "analysis" and self.show_reasoning:
                self._err("[reasoning] ", dim=True)
            elif self.channel not in ("final", "analysis"):
                self._err(f"[{self.channel}] ")
        elif isinstance(event, TextDelta):
            if self.recipient:
                self._err(event.text)
            elif self.channel == "final":
                self.out.write(event.text)
                self.out.flush()
                self.answer_open = True
            elif self.channel == "analysis":
                if self.show_reasoning:
                    self._err(event.text, dim=True)
            else:
                self._err(event.text)
        elif isinstance(event, MessageEnd):
            if self.channel != "final" and (self.channel != "analysis" or self.show_reasoning
                                            or self.recipient):
                self._err("\n")
            self.channel = self.recipient = None
        elif isinstance(event, ToolResult):
            self._err(f"[tool] {event.call.recipient} returned: {event.output}\n")
        elif isinstance(event, GenerationResult):
            if self.verbose:
                self._err(event.stats.summary() + "\n")
        elif isinstance(event, Reply):
            if self.answer_open:
                self.out.write("\n")
                self.out.flush()
                self.answer_open = False
            if event.stop == "length":
                self._err("[stopped: --max-tokens reached]\n")
            elif event.stop == "tool_rounds":
                self._err("[stopped: too many tool rounds]\n")
            elif event.stop == "invalid_call":
                self._err("[stopped: the model called no tool by name]\n")
            elif event.stop == "call":
                call = event.messages[-1]
                self._err(f"[stopped: no result for the call to {call.recipient}]\n")

    def prompt(self, tokens: list[int]) -> None:
        if self.verbose:
            self._err("--- prompt ---\n" + self.tok.decode(tokens) + "\n--------------\n")


def run_turn(chat, text: str, display: Display) -> Any:
    """One user turn, streamed; returns the Reply. Ctrl-C propagates after the turn is undone."""
    from ..chat import Reply
    from ..harmony import Message, Role

    user = Message.from_role_and_content(Role.USER, text)
    if display.verbose:
        display.prompt(_preview(chat, user))
    stream = chat.stream(user)
    reply = None
    try:
        for event in stream:
            display.show(event)
            if isinstance(event, Reply):
                reply = event
    finally:
        stream.close()
    return reply


def _preview(chat, user) -> list[int]:
    """The prompt the first round will see (for --verbose)."""
    chat.messages.append(user)
    try:
        return chat.prompt_tokens()
    finally:
        chat.messages.pop()


def read_prompt(prompt: Optional[str]) -> str:
    if prompt is not None:
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise GptOssError("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
    text = sys.stdin.read()
    if not text.strip():
        raise GptOssError("the prompt on stdin is empty")
    return text


# --------------------------------------------------------------------------- the command


@rank_zero_command
def generate(
    model: str = model_option(),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p",
                                         help="The user message (default: read stdin)."),
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
    as_json: bool = typer.Option(False, "--json", help="One JSON event per line on stdout."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Print the rendered prompt and the stats to stderr."),
) -> None:
    """Generate an answer to one prompt (from --prompt or stdin).

    Function calls to tools from --tools have no implementation here: generation stops at the
    first such call and prints it (`--json`: a tool_call event) so a script can answer it.
    """
    text = read_prompt(prompt)
    chat = load_chat(model, dtype, effort=reasoning_effort, system=system, developer=developer,
                     tools=tools, python=python, temperature=temperature, top_p=top_p,
                     top_k=top_k, min_p=min_p, seed=seed, max_tokens=max_tokens,
                     max_tool_rounds=max_tool_rounds, json_schema=json_schema,
                     parallel=parallel)
    display = Display(chat.tokenizer, show_reasoning=show_reasoning, as_json=as_json,
                      verbose=verbose)
    try:
        reply = run_turn(chat, text, display)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    finally:
        chat.close()
    if reply.stop == "call" and not as_json:
        call = reply.messages[-1]
        print(json.dumps({"tool_call": {"recipient": call.recipient, "arguments": call.text()}}))


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
