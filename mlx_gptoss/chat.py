"""`Chat`: a multi-turn harmony conversation with tools and a prompt cache, over the agent loop.

`Chat` owns state (settings, history, its prompt cache, its tools); each turn is
`agent.run_turn`, with this chat as the router.

Chain of thought, our deliberate choice: the prompt of each turn leaves out the analysis
(reasoning) of every turn that already ended in a final answer, and keeps the analysis inside
the current, still unfinished turn (between tool calls), as the harmony format documents
(`RenderConversationConfig(drop_finished_turns=True)`). openai-harmony's own default drops only
the analysis before the first final answer, so long chats would re-read stale reasoning. The
history (`chat.messages`, `/save`) keeps everything.

The prompt cache makes each turn prefill only what is new. Dropping the analysis changes the
rendered history exactly where the previous turn's generation began, which `PromptCache` has a
snapshot of (it keeps one per generation of the whole turn), so nothing before it is recomputed.
Inside a turn, a tool call is re-rendered recipient first, so the next round's prompt departs
from the cache just after the call's header start; the sliding layers keep `CALL_SLACK` extra
keys to trim back there rather than re-read the round's analysis.

Tool calls go through one `ToolRouter` (`router()`): `functions.*` run the registered Python
callable; a function without one (e.g. from a tools file) goes to `on_tool_call(call) -> str`
(the CLI asks the user); without a handler the turn stops with `stop == "call"` and
`add_tool_result` + `resume` continue it. A function the model invented, or a tool that is not
enabled, gets an error result. `python` (OS-sandboxed) and `browser` run when enabled, and
`builtin_tools` adds tools of your own. Every result goes back as the tool's message and
generation continues, at most `max_tool_rounds` times per turn.

An interrupted turn (Ctrl-C, or the caller closing the stream) is discarded: history and cache
are as before it.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .agent import Reply, ToolResult, render_turn, run_turn
from .cache import PromptCache
from .constrained import JsonSchemaConstraint
from .defaults import DEFAULT_MAX_TOKENS, DEFAULT_TOOL_ROUNDS
from .env import read_json
from .errors import GptOssError, HarmonyError
from .generate import GenerationResult, LogitsProcessor, stream_generate
from .harmony import (
    Author,
    ChannelConfig,
    Conversation,
    DeveloperContent,
    Event,
    HarmonyTokenizer,
    Message,
    ReasoningEffort,
    ResponseFormat,
    Role,
    SystemContent,
    TextContent,
)
from .model import Model
from .prompts import developer_message, parse_effort, system_message
from .sampling import SamplingParams
from .tools.base import Tool, ToolRouter
from .tools.functions import FunctionTool, FunctionsTool, ToolRegistry

CALL_SLACK = 128  # sliding-window keys kept beyond the window: enough to rewind past a call
ToolHandler = Callable[[Message], str]


class Chat:
    """A conversation with the model: `chat.send("hi").text`, or stream with `chat.stream`."""

    # System-message settings that only a loaded conversation changes (harmony's defaults).
    knowledge_cutoff: str | None = SystemContent().knowledge_cutoff
    channel_config: ChannelConfig | None = None  # None: harmony's required analysis/commentary/final

    def __init__(self, model: Model, tokenizer: HarmonyTokenizer, *,
                 instructions: str | None = None, system: str | None = None,
                 reasoning_effort: str | ReasoningEffort = "medium",
                 tools: Iterable[FunctionTool | Callable[..., Any]] = (),
                 python: bool | Tool = False, browser: bool | Tool = False,
                 builtin_tools: Iterable[Tool] = (), on_tool_call: ToolHandler | None = None,
                 max_tool_rounds: int = DEFAULT_TOOL_ROUNDS,
                 max_tokens: int = DEFAULT_MAX_TOKENS, sampling: SamplingParams | None = None,
                 logits_processors: Iterable[LogitsProcessor] = (),
                 prompt_cache: bool = True, date: str | None = None,
                 response_format: Any = None, constrain_tools: bool = True,
                 max_reasoning_tokens: int | None = None, kv_bits: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.instructions = instructions
        self.system = system
        self.reasoning_effort = parse_effort(reasoning_effort)
        self.tools = ToolRegistry(tools)
        self.python = _builtin(python, "PythonTool")
        self.browser = _builtin(browser, "BrowserTool")
        self.builtin_tools = list(builtin_tools)
        self.on_tool_call = on_tool_call
        self.max_tool_rounds = max_tool_rounds
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.logits_processors = list(logits_processors)
        self.date = date
        # Structured output: every final answer validates against `response_format` (a JSON
        # Schema, a pydantic model class, or a loaded conversation's `ResponseFormat`); with
        # `constrain_tools`, every function call's arguments validate against its parameters.
        self.response_format = response_format
        self.constrain_tools = constrain_tools
        # The reasoning budget of every generation (None: unbounded); see `stream_generate`.
        self.max_reasoning_tokens = max_reasoning_tokens
        self._constraint: tuple[tuple, JsonSchemaConstraint | None] | None = None
        self.json_constraint()  # a bad schema fails here, before any generation
        # The slack lets a tool round trim back to where its call is re-rendered (recipient
        # first, after the round's analysis) instead of re-reading that analysis.
        # `kv_bits` (8 or 4): the full-attention layers' keys and values are kept quantized.
        self.cache = (PromptCache.for_model(model, sliding_slack=CALL_SLACK, kv_bits=kv_bits)
                      if prompt_cache else None)
        self.messages: list[Message] = []
        self._generations = 0

    # ----------------------------------------------------------------- the conversation

    def header(self) -> list[Message]:
        """The system and developer messages this chat's settings render to."""
        system = system_message(reasoning_effort=self.reasoning_effort, identity=self.system,
                                date=self.date)
        for namespace in self.router().namespaces("system"):  # built-in tools, as trained
            system.content[0].with_tools(namespace)
        system.content[0].knowledge_cutoff = self.knowledge_cutoff
        if self.channel_config is not None:
            system.content[0].channel_config = self.channel_config
        messages = [system]
        constraint = self.json_constraint()
        dev = developer_message(self.instructions, self.tools.descriptions(),
                                constraint.response_format if constraint else None)
        if dev is not None:
            messages.append(dev)
        return messages

    def json_constraint(self) -> JsonSchemaConstraint | None:
        """The compiled constraint, or None; compiled again only when the tools or the
        response format change."""
        self._constraint = self._compile_constraint(self.tools, self.response_format)
        return self._constraint[1]

    def _compile_constraint(self, tools: ToolRegistry, response_format: Any
                            ) -> tuple[tuple, JsonSchemaConstraint | None]:
        """(cache key, constraint) for these settings; the cached one when they are unchanged."""
        descriptions = tools.descriptions() if self.constrain_tools else []
        budget = self.max_reasoning_tokens
        key = (descriptions, _format_key(response_format), budget)
        if self._constraint is not None and self._constraint[0] == key:
            return self._constraint
        if response_format is None and not descriptions and budget is None:
            return key, None
        loaded = isinstance(response_format, ResponseFormat)  # from a loaded conversation
        constraint = JsonSchemaConstraint.from_schema(
            self.tokenizer, response_format.schema if loaded else response_format,
            tools=descriptions, max_reasoning_tokens=budget)
        if loaded:
            constraint.response_format = response_format  # its name and description, verbatim
        return key, constraint

    def conversation(self) -> Conversation:
        return Conversation(self.header() + self.messages)

    def prompt_tokens(self) -> list[int]:
        """What the model reads next: the conversation, earlier reasoning dropped."""
        return render_turn(self.tokenizer, self.conversation())

    def reset(self) -> None:
        """Forget the history; settings stay, the python session restarts."""
        self.messages = []
        if self.python is not None:
            self.python.restart()

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole conversation as openai-harmony JSON."""
        try:
            Path(path).write_text(self.conversation().to_json() + "\n", encoding="utf-8")
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
            raise GptOssError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}") from None

    def load(self, path: str | os.PathLike) -> None:
        """Replace history and settings with a saved conversation (openai-harmony JSON)."""
        data = read_json(path, "saved chat", expect=dict, error=HarmonyError)
        try:
            conversation = Conversation.from_dict(data)
        except HarmonyError as e:
            raise HarmonyError(f"{path}: {e}") from None
        self.set_conversation(conversation)

    def set_conversation(self, conversation: Conversation | Iterable[Message]) -> None:
        """Replace history and settings: the conversation's system and developer messages
        define effort, identity, date, instructions, function tools and response format (what
        they leave out is unset), and knowledge cutoff, channel config and the python tool. A
        declared function keeps its registered Python callable. The python tool is never
        switched on by a file (model-written code runs only when the user opts in): loading a
        conversation that uses it into a chat without it raises. Invalid settings raise before
        anything changes."""
        system, developer, history = SystemContent(), DeveloperContent(), []
        for message in conversation:
            part = message.content[0] if len(message.content) == 1 else None
            if isinstance(part, SystemContent):
                system = part
            elif isinstance(part, DeveloperContent):
                developer = part
            else:
                history.append(message)
        functions = (developer.tools or {}).get("functions")
        tools = ToolRegistry()
        for tool in functions.tools if functions else []:
            registered = self.tools.tools.get(tool.name)
            tools.add(FunctionTool(tool.name, tool.description, tool.parameters,
                                   registered.function if registered else None))
        formats = developer.response_formats or []
        if len(formats) > 1:
            raise GptOssError(f"a chat takes one response format; the conversation has {len(formats)}")
        response_format = formats[0] if formats else None
        constraint = self._compile_constraint(tools, response_format)  # a bad schema raises here
        declared = system.tools or {}
        for name in ("python", "browser"):  # a file never switches a built-in tool on
            if name in declared and getattr(self, name) is None:
                raise GptOssError(f"the conversation uses the {name} tool, which this chat does "
                                  f"not have: enable it (--{name}) to load it")
        for name in ("python", "browser"):
            tool = getattr(self, name)
            if name not in declared and tool is not None:
                tool.close()
                setattr(self, name, None)
        self.knowledge_cutoff = system.knowledge_cutoff
        self.channel_config = system.channel_config
        self.reasoning_effort = system.reasoning_effort
        self.system = None if system.model_identity == SystemContent().model_identity \
            else system.model_identity
        self.date = system.conversation_start_date
        self.instructions = developer.instructions
        self.tools = tools
        self.response_format = response_format
        self._constraint = constraint
        self.messages = history

    # ----------------------------------------------------------------- turns

    def send(self, text: str | Message) -> Reply:
        """Add a user message and run the assistant (and tools) until it answers."""
        reply = None
        for event in self.stream(text):
            reply = event
        return reply

    def stream(self, text: str | Message) -> Iterator[Event | GenerationResult | ToolResult | Reply]:
        """Like `send`, yielding harmony events, each round's `GenerationResult`, each
        `ToolResult`, and finally the `Reply`."""
        user = text if isinstance(text, Message) else Message.from_role_and_content(Role.USER, text)
        yield from self._turn([user])

    def _turn(self, new: list[Message]) -> Iterator[Event | GenerationResult | ToolResult | Reply]:
        """One turn through the agent loop; the history changes only once it has ended (an
        interrupted turn leaves it as it was)."""
        history = self.messages + new
        for event in run_turn(self._generate, self.tokenizer, self.header(), history,
                              router=self, max_tool_rounds=self.max_tool_rounds):
            if isinstance(event, Reply):
                self.messages = history + event.messages
            yield event

    def add_tool_result(self, call: Message, output: str) -> Message:
        """Answer a call left open (`reply.stop == "call"`); then `resume()`."""
        reply = _tool_reply(call, output)
        self.messages.append(reply)
        return reply

    def resume(self) -> Reply:
        """Continue the current turn after `add_tool_result`."""
        reply = None
        for event in self._turn([]):
            reply = event
        return reply

    def _generate(self, prompt: list[int]) -> Iterator[Event | GenerationResult]:
        sampling = self.sampling
        if sampling is not None and sampling.seed is not None:
            # One seed makes the session reproducible; each generation draws fresh numbers.
            sampling = replace(sampling, seed=(sampling.seed + self._generations) % 2**64)
        self._generations += 1
        if self.cache is not None:
            # One snapshot per generation: keep those of the whole turn, so the snapshot where
            # the turn began (where the next turn drops its analysis) is still there.
            self.cache.max_snapshots = max(PromptCache.max_snapshots, self.max_tool_rounds + 2)
        processors = list(self.logits_processors)
        constraint = self.json_constraint()
        if constraint is not None:
            processors.append(constraint.processor(prompt, max_tokens=self.max_tokens))
        return stream_generate(self.model, self.tokenizer, prompt, max_tokens=self.max_tokens,
                               sampling=sampling, logits_processors=processors,
                               prompt_cache=self.cache)

    def router(self) -> ToolRouter:
        """This chat's tools, routed by recipient: its functions (the registered callables;
        the others go to `on_tool_call`, else back to the caller), the python and browser
        tools when enabled, and any `builtin_tools`. Built from the current settings."""
        tools: list[Tool] = [FunctionsTool(self.tools, on_call=self.on_tool_call)]
        tools += [t for t in (self.python, self.browser) if t is not None]
        return ToolRouter(tools + self.builtin_tools)

    def process(self, call: Message) -> list[Message]:
        """The agent loop's router: the tool's replies to `call`, or [] when nobody here can
        answer it (the turn then stops with `stop == "call"`)."""
        return self.router().process(call)

    def close(self) -> None:
        """Stop the tools' processes (the python sandbox) and drop their state."""
        for tool in (self.python, self.browser, *self.builtin_tools):
            if tool is not None:
                tool.close()

    def __repr__(self) -> str:
        effort = self.reasoning_effort.value.lower() if self.reasoning_effort else "none"
        tools = ", ".join(self.tools.tools) or "none"
        return (f"Chat({len(self.messages)} messages, effort {effort}, tools: {tools}, python "
                f"{'on' if self.python is not None else 'off'}, max_tokens {self.max_tokens}, "
                f"{self.model!r})")

    def __enter__(self) -> "Chat":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tool_reply(call: Message, output: str) -> Message:
    """A tool's answer to `call`, in harmony's shape: from the tool, back to the assistant."""
    return Message(Author(Role.TOOL, call.recipient), [TextContent(output)],
                   call.channel or "commentary", "assistant")


def _format_key(response_format: Any) -> Any:
    """What identifies a response format: a schema by its JSON (so editing it in place
    counts), a pydantic model class by itself."""
    if isinstance(response_format, ResponseFormat):
        response_format = response_format.to_dict()
    try:
        return json.dumps(response_format, sort_keys=True)
    except (TypeError, ValueError):
        return response_format


def _builtin(tool: bool | Tool | None, default: str) -> Tool | None:
    """A built-in tool from a flag (True: the default `mlx_gptoss.tools` class) or a tool."""
    if tool is False or tool is None:
        return None
    if tool is True:
        from . import tools

        return getattr(tools, default)()
    return tool
