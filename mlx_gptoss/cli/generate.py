"""`mlx-gptoss generate`: one prompt, one answer.

The final answer goes to stdout; reasoning, tool traffic, the prompt (`--verbose`) and the stats
(`--stats`, on by default when stderr is a terminal) go to stderr, so
`answer=$(mlx-gptoss generate ...)` captures the answer alone. `--json` prints one JSON event
per line on stdout instead. The display helpers here are shared with `chat`.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, TextIO

import typer

from ..defaults import (DEFAULT_MAX_TOKENS, DEFAULT_REASONING_EFFORT, DEFAULT_TOOL_ROUNDS,
                        REASONING_EFFORTS as EFFORTS)
from ..distributed import rank_zero_command
from ..errors import GptOssError
from ..harmony.constants import (ANALYSIS, FINAL, STOP_CALL, STOP_INVALID_CALL, STOP_LENGTH,
                                 STOP_TOOL_ROUNDS)

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
              python_unsafe: bool = False, confirm_code=None, browser: bool = False,
              browser_search: Optional[str] = None, browser_allow_private: bool = False,
              max_reasoning_tokens: Optional[int] = None, adapter: Optional[Path] = None,
              parallel: str = "auto", pipeline_memory: Optional[str] = None,
              kv_bits: Optional[int] = None):
    """Everything both commands need: loaded model, tools, sampling, a `Chat`.

    Every option is checked, and every file read, before the model loads (which can take
    minutes and download gigabytes)."""
    from ..cache import KV_BITS as KV_CACHE_BITS
    from ..chat import Chat
    from ..constrained import load_json_schema
    from ..distributed import load
    from ..config import ModelConfig
    from ..memory import estimate_memory
    from ..tools.functions import load_tools_file

    overrides = check_sampling_options(temperature=temperature, top_p=top_p, top_k=top_k,
                                       min_p=min_p, seed=seed)
    check_effort(effort)
    if dtype is not None:
        from ..loading import resolve_dtype

        resolve_dtype(dtype)
    if kv_bits is not None and kv_bits not in KV_CACHE_BITS:
        raise GptOssError(f"--kv-bits must be one of {', '.join(map(str, KV_CACHE_BITS))}, "
                          f"got {kv_bits}")
    functions = load_tools_file(tools) if tools is not None else []
    response_format = load_json_schema(json_schema) if json_schema is not None else None
    builtins = builtin_tools(
        python=python, python_unsafe=python_unsafe, confirm_code=confirm_code, browser=browser,
        browser_search=browser_search, browser_allow_private=browser_allow_private)
    python_tool, browser_tool = (builtins[name]() if name in builtins else None
                                 for name in ("python", "browser"))
    used = [flag for flag, on in (("--python", python), ("--browser", browser)) if on]
    net, tokenizer = load(model, dtype, adapter=adapter, parallel=parallel,
                          pipeline_memory=pipeline_memory, tools=used)
    context = getattr(net.config, "max_position_embeddings", None)
    if context is not None and max_tokens > context:
        raise GptOssError(f"--max-tokens {max_tokens} is more than the model's context length "
                          f"({context} tokens)")
    sampling = net.sampling_defaults.with_overrides(**overrides)
    session = Chat(net, tokenizer, instructions=developer, system=system,
                   reasoning_effort=effort, tools=functions, python=python_tool or False,
                   browser=browser_tool or False, on_tool_call=on_tool_call,
                   max_reasoning_tokens=max_reasoning_tokens, max_tool_rounds=max_tool_rounds,
                   max_tokens=max_tokens, sampling=sampling, response_format=response_format,
                   kv_bits=kv_bits)
    if isinstance(net.config, ModelConfig):  # a gpt-oss model (not a stand-in): its memory
        warning = estimate_memory(net, max_tokens, kv_bits).warning()  # before any prompt runs
        if warning:
            print(warning, file=sys.stderr)
    return session


def builtin_tools(*, python: bool, python_unsafe: bool, confirm_code, browser: bool,
                  browser_search: Optional[str], browser_allow_private: bool) -> dict:
    """Factories of the python and browser tools the flags ask for (`{"python": ...,
    "browser": ...}`, each present only when on): `generate` and `chat` make one session, the
    server one per response. Checked now, before the model loads, so a bad flag or search
    provider is the first thing the user sees."""
    from functools import partial

    from ..tools import BrowserTool, PythonTool
    from ..tools.search import search_provider

    if python_unsafe and not python:
        raise GptOssError("--python-unsafe-no-sandbox needs --python")
    if (browser_search is not None or browser_allow_private) and not browser:
        raise GptOssError("--browser-search and --browser-allow-private need --browser")
    tools = {}
    if python:
        tools["python"] = partial(PythonTool, unsafe_no_sandbox=python_unsafe, confirm=confirm_code)
    if browser:
        tools["browser"] = partial(BrowserTool, search_provider(browser_search),
                                   allow_private=browser_allow_private)
    return tools


def check_effort(effort: str) -> None:
    if effort.lower() not in EFFORTS:
        raise GptOssError(f"--reasoning-effort must be one of {', '.join(EFFORTS)}, got {effort!r}")


def check_sampling_options(**options: float | int | None) -> dict:
    """The sampling flags that were given, checked by `SamplingParams` itself (one set of
    rules), plus finiteness: `nan` passes every comparison and `inf` would divide the logits."""
    from ..sampling import SamplingParams

    given = {k: v for k, v in options.items() if v is not None}
    for name, value in given.items():
        if isinstance(value, float) and not math.isfinite(value):
            flag = "--temp" if name == "temperature" else "--" + name.replace("_", "-")
            raise GptOssError(f"{flag} must be a finite number, got {value}")
    SamplingParams(**given)
    return given


# --------------------------------------------------------------------------- shared options
# `generate` and `chat` take the same session options; each is defined once here.
EFFORT = typer.Option(DEFAULT_REASONING_EFFORT, "--reasoning-effort", "-r",
                      help="low, medium or high.")
SYSTEM = typer.Option(None, "--system", help="Model identity line of the system message.")
DEVELOPER = typer.Option(None, "--developer", help="Developer instructions.")
SHOW_REASONING = typer.Option(True, "--show-reasoning/--hide-reasoning",
                              help="Stream the analysis channel to stderr.")
MAX_TOKENS = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", min=1, metavar="<int>",
                          help="Tokens per generation (at most the context length).")
TEMPERATURE = typer.Option(None, "--temperature", "--temp",
                           help="Default: generation_config, else 1.0.")
TOP_P = typer.Option(None, "--top-p", help="Default 1.0 (off).")
TOP_K = typer.Option(None, "--top-k", help="Default 0 (off).")
MIN_P = typer.Option(None, "--min-p", help="Default 0.0 (off).")
SEED = typer.Option(None, "--seed", help="Make sampling reproducible.")
TOOLS = typer.Option(None, "--tools", help="JSON list of OpenAI-style function tools.")
PYTHON = typer.Option(False, "--python", help=(
    "Let the model run Python in an OS sandbox (Linux: bubblewrap; macOS: sandbox-exec): no "
    "network, writes only in its session directory. See docs/tools.md."))
PYTHON_AUTO = typer.Option(False, "--python-auto",
                           help="Run the model's python code without asking before each run.")
PYTHON_UNSAFE = typer.Option(False, "--python-unsafe-no-sandbox", help=(
    "Where no OS sandbox works, run python code WITHOUT isolation: it can read your files and "
    "environment and use the network."))
BROWSER = typer.Option(False, "--browser", help="Let the model search and open web pages.")
BROWSER_SEARCH = typer.Option(None, "--browser-search",
                              help="Search provider: exa (EXA_API_KEY), searxng:URL or ddgs.")
BROWSER_ALLOW_PRIVATE = typer.Option(False, "--browser-allow-private", help=(
    "Let the browser open private, loopback and link-local addresses (blocked by default)."))
MAX_TOOL_ROUNDS = typer.Option(DEFAULT_TOOL_ROUNDS, "--max-tool-rounds", min=0, metavar="<int>",
                               help="Tool calls per turn.")
MAX_REASONING_TOKENS = typer.Option(
    None, "--max-reasoning-tokens", min=0, metavar="<int>",
    help="Close the reasoning after this many tokens and answer (with --json-schema, early "
         "enough that the answer fits in --max-tokens).")
JSON_SCHEMA = typer.Option(None, "--json-schema",
                           help="JSON Schema file: every answer is JSON that validates against it.")
ADAPTER = typer.Option(None, "--adapter", "--adapter-path",
                       help="LoRA adapter directory (PEFT format, e.g. from `mlx-gptoss lora`).")
PARALLEL = typer.Option("auto", "--parallel", help=(
    "Under mlx.launch: expert, pipeline or auto (expert unless there are more ranks than "
    "experts); counts per rank may follow, e.g. pipeline:10,14. See docs/distributed.md."))
PIPELINE_MEMORY = typer.Option(None, "--pipeline-memory", metavar="<GB,GB,...>", help=(
    "With --parallel pipeline: split the layers in proportion to these per-rank memories "
    "(GB, or fractions: 64,32 or 0.67,0.33); default: each rank's measured memory."))
DTYPE = typer.Option(None, "--dtype",
                     help="Compute dtype (bfloat16, float32...). Default: float32 activations "
                          "on the CPU backend, bfloat16 on a GPU.")
KV_BITS = typer.Option(None, "--kv-bits", metavar="<8|4>",
                       help="Quantize the full-attention layers' KV cache to 8 or 4 bits "
                            "(long contexts in less memory; docs/long-context.md).")
STATS = typer.Option(None, "--stats/--no-stats",
                     help="Speed and memory of each generation on stderr (default: on when "
                          "stderr is a terminal).")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Print each rendered prompt to stderr.")


# --------------------------------------------------------------------------- display


class Display:
    """Streams a chat's events: the answer to `out`, the rest to `err` (dimmed on a TTY).

    `verbose` prints each prompt; `stats` (default: when `err` is a terminal) each
    generation's speed and memory, so a script's stderr stays quiet unless asked.
    `hold_answer` (with a JSON schema) prints the answer only once it is whole: a program
    reading stdout never gets JSON that max_tokens cut off."""

    def __init__(self, tokenizer, *, show_reasoning: bool = True, as_json: bool = False,
                 verbose: bool = False, stats: bool | None = None, out: TextIO | None = None,
                 err: TextIO | None = None, hold_answer: bool = False):
        self.tok = tokenizer
        self.show_reasoning = show_reasoning
        self.as_json = as_json
        self.verbose = verbose
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.dim = self.err.isatty()
        self.stats = self.dim if stats is None else stats
        self.channel: str | None = None
        self.recipient: str | None = None
        self.answer_open = False
        self.hold_answer = hold_answer
        self.held: list[str] = []

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
            elif self.channel == ANALYSIS and self.show_reasoning:
                self._err("[reasoning] ", dim=True)
            elif self.channel not in (FINAL, ANALYSIS):
                self._err(f"[{self.channel}] ")
        elif isinstance(event, TextDelta):
            if self.recipient:
                self._err(event.text)
            elif self.channel == FINAL:
                if self.hold_answer:
                    self.held.append(event.text)
                else:
                    self.out.write(event.text)
                    self.out.flush()
                    self.answer_open = True
            elif self.channel == ANALYSIS:
                if self.show_reasoning:
                    self._err(event.text, dim=True)
            else:
                self._err(event.text)
        elif isinstance(event, MessageEnd):
            if self.channel != FINAL and (self.channel != ANALYSIS or self.show_reasoning
                                            or self.recipient):
                self._err("\n")
            self.channel = self.recipient = None
        elif isinstance(event, ToolResult):
            self._err(f"[tool] {event.call.recipient} returned: {event.output}\n")
        elif isinstance(event, GenerationResult):
            if self.stats:
                self._err(event.stats.summary() + "\n")
        elif isinstance(event, Reply):
            held, self.held = "".join(self.held), []
            if held and event.complete:
                self.out.write(held)
                self.answer_open = True
            if self.answer_open:
                self.out.write("\n")
                self.out.flush()
                self.answer_open = False
            if not event.complete:
                self._err("[stopped: --max-tokens ended the answer before its JSON was "
                          "complete; nothing was printed]\n")
            elif event.stop == STOP_LENGTH:
                self._err("[stopped: --max-tokens reached]\n")
            elif event.stop == STOP_TOOL_ROUNDS:
                self._err("[stopped: too many tool rounds]\n")
            elif event.stop == STOP_INVALID_CALL:
                self._err("[stopped: the model called no tool by name]\n")
            elif event.stop == STOP_CALL:
                call = event.messages[-1]
                self._err(f"[stopped: no result for the call to {call.recipient}]\n")

    def prompt(self, tokens: list[int]) -> None:
        if self.verbose:
            self._err("--- prompt ---\n" + self.tok.decode(tokens) + "\n--------------\n")


def run_turn(chat, text: Any, display: Display) -> Any:
    """One user turn (`text`, or a tool's result `Message` that resumes a turn), streamed;
    returns the Reply. Ctrl-C propagates after the turn is undone."""
    from ..chat import Reply
    from ..harmony import Message, Role

    user = text if isinstance(text, Message) else Message.from_role_and_content(Role.USER, text)
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
        if not prompt.strip():
            raise GptOssError("the prompt (--prompt) is empty")
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise GptOssError("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
    text = sys.stdin.read()
    if not text.strip():
        raise GptOssError("the prompt on stdin is empty")
    return text


def read_conversation(path: Optional[Path]) -> Optional[list]:
    """The messages of a `--conversation` file (None: no option, or a file still to create),
    read and validated before the model loads."""
    from ..env import read_json
    from ..errors import DataError, HarmonyError
    from ..harmony import Conversation, Role
    from ..train_data import is_harmony_row, row_messages

    if path is None or not path.exists():
        return None
    data = read_json(path, "conversation", expect=dict, error=HarmonyError)
    if is_harmony_row(data) or not isinstance(data.get("messages"), list):
        try:
            return list(Conversation.from_dict(data))
        except HarmonyError as e:
            raise HarmonyError(f"{path}: {e}") from None
    # OpenAI chat messages (content strings, tool_calls, tool messages, reasoning fields): the
    # fine-tuning data reader converts them; its system/developer header only when the file
    # says something the command's settings should give way to.
    try:
        messages = row_messages(data, str(path))
    except DataError as e:
        raise HarmonyError(str(e)) from None
    has_header = "reasoning_effort" in data or "tools" in data or any(
        isinstance(m, dict) and m.get("role") in ("system", "developer") for m in data["messages"])
    if not has_header:
        messages = [m for m in messages if m.author.role not in (Role.SYSTEM, Role.DEVELOPER)]
    return messages


def ends_with_tool_result(messages: Optional[list]) -> bool:
    from ..harmony import Role

    return bool(messages) and messages[-1].author.role is Role.TOOL


def continue_conversation(chat, messages: list) -> Any:
    """Put saved `messages` into `chat`: a file with its own system/developer messages brings
    their settings, one without keeps the command's. Returns the trailing tool result that
    resumes the turn (taken off the history, `run_turn` adds it back), else None."""
    from ..harmony import Role

    if any(m.author.role in (Role.SYSTEM, Role.DEVELOPER) for m in messages):
        chat.set_conversation(messages)
    else:
        chat.messages = list(messages)
    return chat.messages.pop() if ends_with_tool_result(chat.messages) else None


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
    as_json: bool = typer.Option(False, "--json", help="One JSON event per line on stdout."),
    stats: Optional[bool] = STATS,
    verbose: bool = VERBOSE,
    conversation: Optional[Path] = typer.Option(
        None, "--conversation", help="Continue the conversation in this file (openai-harmony "
        "JSON, as chat's /save writes; created if missing) and write the turn back to it. If "
        "it ends with a tool's result, the turn resumes: no prompt. OpenAI chat messages JSON "
        "({\"messages\": [...]}) is read too and written back as harmony JSON."),
) -> None:
    """Generate an answer to one prompt (from --prompt or stdin).

    Function calls to tools from --tools have no implementation here: generation stops at the
    first such call and prints it (`--json`: a tool_call event). A script answers it by
    appending the tool's message to the --conversation file and running generate again.
    """
    if python and not python_auto:
        raise GptOssError("generate cannot ask before running the model's code: pass "
                          "--python-auto with --python (chat asks before each run)")
    history = read_conversation(conversation)
    resume = ends_with_tool_result(history)
    if resume and prompt is not None:
        raise GptOssError(f"{conversation} ends with a tool's result: continue it without "
                          "--prompt")
    text = None if resume else read_prompt(prompt)
    chat = None
    try:
        chat = load_chat(model, dtype, effort=reasoning_effort, system=system,
                         developer=developer, tools=tools, python=python,
                         python_unsafe=python_unsafe, browser=browser,
                         browser_search=browser_search,
                         browser_allow_private=browser_allow_private,
                         max_reasoning_tokens=max_reasoning_tokens, adapter=adapter,
                         temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                         seed=seed, max_tokens=max_tokens, max_tool_rounds=max_tool_rounds,
                         json_schema=json_schema, parallel=parallel,
                         pipeline_memory=pipeline_memory, kv_bits=kv_bits)
        display = Display(chat.tokenizer, show_reasoning=show_reasoning, as_json=as_json,
                          verbose=verbose, stats=stats, hold_answer=json_schema is not None)
        if history is not None:
            tool_result = continue_conversation(chat, history)
            text = tool_result if tool_result is not None else text
        reply = run_turn(chat, text, display)
        if conversation is not None:
            chat.save(conversation)
    except KeyboardInterrupt:  # while loading or generating
        print("\ninterrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    finally:
        if chat is not None:
            chat.close()
    if reply.stop == STOP_CALL and not as_json:
        call = reply.messages[-1]
        print(json.dumps({"tool_call": {"recipient": call.recipient, "arguments": call.text()}}))
    if not reply.complete:  # the answer a script waits for is not there: say so by the code
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
