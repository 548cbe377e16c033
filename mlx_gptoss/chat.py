"""`Chat`: a multi-turn harmony conversation with tools and a prompt cache.

Chain of thought, our deliberate choice: the prompt of each turn leaves out the analysis
(reasoning) of every turn that already ended in a final answer, and keeps the analysis inside
the current, still unfinished turn (between tool calls), as the harmony format documents
(`RenderConversationConfig(drop_finished_turns=True)`). openai-harmony's own default drops only
the analysis before the first final answer, so long chats would re-read stale reasoning. The
history (`chat.messages`, `/save`) keeps everything.

The prompt cache makes each turn prefill only what is new. Dropping the analysis changes the
rendered history exactly where the previous turn's generation began, which `PromptCache` has a
snapshot of, so nothing before it is recomputed.

Tool calls: `functions.*` run the registered Python callable; a function without one (e.g. from
a tools file) goes to `on_tool_call(call) -> str` (the CLI asks the user); without a handler the
turn stops with `stop == "call"` and `add_tool_result` + `resume` continue it. A function the
model invented gets an error result. `python` runs in the sandbox when enabled. Every result goes back as
the tool's message and generation continues, at most `max_tool_rounds` times per turn.

An interrupted turn (Ctrl-C, or the caller closing the stream) is discarded: history and cache
are as before it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .cache import PromptCache
from .constrained import JsonSchemaConstraint
from .errors import GptOssError, HarmonyError
from .generate import (
    DEFAULT_MAX_TOKENS,
    GenerationResult,
    LogitsProcessor,
    developer_message,
    parse_effort,
    stream_generate,
    system_message,
)
from .harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Event,
    HarmonyTokenizer,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    TextContent,
    render_conversation_for_completion,
)
from .model import Model
from .sampling import SamplingParams
from .tools.functions import FunctionTool, ToolRegistry

RENDER_CONFIG = RenderConversationConfig(auto_drop_analysis=True, drop_finished_turns=True)
DEFAULT_TOOL_ROUNDS = 8
ToolHandler = Callable[[Message], str]


@dataclass(frozen=True)
class ToolResult:
    """Streamed after a tool ran: the call (an assistant message) and the tool's reply."""

    call: Message
    result: Message

    @property
    def output(self) -> str:
        return self.result.text()


@dataclass
class Reply:
    """One turn: everything the assistant and tools said, and why it ended.

    `stop`: "return" (final answer), "call" (a tool call was left unanswered), "length",
    "eos", "tool_rounds" (the bound on tool rounds was reached) or "invalid_call" (`<|call|>`
    ended a message with no recipient).
    """

    messages: list[Message]
    stop: str
    generations: list[GenerationResult] = field(default_factory=list)

    @property
    def text(self) -> str:
        finals = [m for m in self.messages if m.author.role is Role.ASSISTANT and m.channel == "final"]
        return finals[-1].text() if finals else ""

    @property
    def reasoning(self) -> str:
        return "\n".join(m.text() for m in self.messages if m.channel == "analysis"
                         and m.author.role is Role.ASSISTANT and m.recipient is None)

    @property
    def tool_calls(self) -> list[Message]:
        return [m for m in self.messages if m.author.role is Role.ASSISTANT and m.recipient]

    def __str__(self) -> str:
        return self.text


class Chat:
    """A conversation with the model: `chat.send("hi").text`, or stream with `chat.stream`."""

    def __init__(self, model: Model, tokenizer: HarmonyTokenizer, *,
                 instructions: str | None = None, system: str | None = None,
                 reasoning_effort: str | ReasoningEffort = "medium",
                 tools: Iterable[FunctionTool | Callable[..., Any]] = (),
                 python: bool | Any = False, on_tool_call: ToolHandler | None = None,
                 max_tool_rounds: int = DEFAULT_TOOL_ROUNDS,
                 max_tokens: int = DEFAULT_MAX_TOKENS, sampling: SamplingParams | None = None,
                 logits_processors: Iterable[LogitsProcessor] = (),
                 prompt_cache: bool = True, date: str | None = None,
                 response_format: Any = None, constrain_tools: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.instructions = instructions
        self.system = system
        self.reasoning_effort = parse_effort(reasoning_effort)
        self.tools = ToolRegistry(tools)
        self.python = _python_tool(python)
        self.on_tool_call = on_tool_call
        self.max_tool_rounds = max_tool_rounds
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.logits_processors = list(logits_processors)
        self.date = date
        # Structured output: every final answer validates against `response_format` (a JSON
        # Schema or a pydantic model class); with `constrain_tools`, every function call's
        # arguments validate against its parameters.
        self.response_format = response_format
        self.constrain_tools = constrain_tools
        self._constraint: tuple[list, JsonSchemaConstraint | None] | None = None
        self.json_constraint()  # a bad schema fails here, before any generation
        self.cache = PromptCache.for_model(model) if prompt_cache else None
        self.messages: list[Message] = []
        self._generations = 0

    # ----------------------------------------------------------------- the conversation

    def header(self) -> list[Message]:
        """The system and developer messages this chat's settings render to."""
        messages = [system_message(reasoning_effort=self.reasoning_effort, identity=self.system,
                                   date=self.date, python_tool=self.python is not None)]
        constraint = self.json_constraint()
        dev = developer_message(self.instructions, self.tools.descriptions(),
                                constraint.response_format if constraint else None)
        if dev is not None:
            messages.append(dev)
        return messages

    def json_constraint(self) -> JsonSchemaConstraint | None:
        """The compiled constraint, or None; compiled again only when the tools change."""
        tools = self.tools.descriptions() if self.constrain_tools else []
        if self._constraint is None or self._constraint[0] != tools:
            needed = self.response_format is not None or tools
            self._constraint = (tools, JsonSchemaConstraint.from_schema(
                self.tokenizer, self.response_format, tools=tools) if needed else None)
        return self._constraint[1]

    def conversation(self) -> Conversation:
        return Conversation(self.header() + self.messages)

    def prompt_tokens(self) -> list[int]:
        """What the model reads next: the conversation, earlier reasoning dropped."""
        return render_conversation_for_completion(self.conversation(), Role.ASSISTANT,
                                                  RENDER_CONFIG, self.tokenizer)

    def reset(self) -> None:
        """Forget the history; settings stay, the python session restarts."""
        self.messages = []
        if self.python is not None:
            self.python.restart()

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole conversation as openai-harmony JSON."""
        try:
            Path(path).write_text(self.conversation().to_json() + "\n", encoding="utf-8")
        except OSError as e:
            raise GptOssError(f"cannot write {path}: {e.strerror}") from None

    def load(self, path: str | os.PathLike) -> None:
        """Replace history and settings with a saved conversation (openai-harmony JSON)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GptOssError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        try:
            conversation = Conversation.from_json(text)
        except HarmonyError as e:
            raise HarmonyError(f"{path}: {e}") from None
        self.set_conversation(conversation)

    def set_conversation(self, conversation: Conversation | Iterable[Message]) -> None:
        messages = list(conversation)
        history = []
        for message in messages:
            part = message.content[0] if len(message.content) == 1 else None
            if isinstance(part, SystemContent):
                self.reasoning_effort = part.reasoning_effort
                if part.model_identity != SystemContent().model_identity:
                    self.system = part.model_identity
                self.date = part.conversation_start_date
            elif isinstance(part, DeveloperContent):
                self.instructions = part.instructions
                functions = (part.tools or {}).get("functions")
                for tool in functions.tools if functions else []:
                    if tool.name not in self.tools:
                        self.tools.add(FunctionTool(tool.name, tool.description, tool.parameters))
            else:
                history.append(message)
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
        start = len(self.messages)
        self.messages.append(user)
        yield from self._turn(start + 1, undo_to=start)

    def _turn(self, start: int, undo_to: int) -> Iterator[Event | GenerationResult | ToolResult | Reply]:
        generations: list[GenerationResult] = []
        try:
            rounds = 0
            while True:
                result = yield from self._generate()
                generations.append(result)
                self.messages.extend(result.messages)
                if result.stop != "call":
                    stop = result.stop
                    break
                if rounds >= self.max_tool_rounds:
                    stop = "tool_rounds"
                    break
                rounds += 1
                call = result.messages[-1] if result.messages else None
                if call is None or not call.recipient:  # <|call|> closed a message to nobody
                    stop = "invalid_call"
                    break
                output = self._run_tool(call)
                if output is None:
                    stop = "call"
                    break
                yield ToolResult(call, self.add_tool_result(call, output))
        except BaseException:
            del self.messages[undo_to:]
            raise
        yield Reply(self.messages[start:], stop, generations)

    def add_tool_result(self, call: Message, output: str) -> Message:
        """Answer a call left open (`reply.stop == "call"`); then `resume()`."""
        reply = Message(Author(Role.TOOL, call.recipient), [TextContent(output)],
                        call.channel or "commentary", "assistant")
        self.messages.append(reply)
        return reply

    def resume(self) -> Reply:
        """Continue the current turn after `add_tool_result`."""
        reply = None
        for event in self._turn(len(self.messages), undo_to=len(self.messages)):
            reply = event
        return reply

    def _generate(self):
        sampling = self.sampling
        if sampling is not None and sampling.seed is not None:
            # One seed makes the session reproducible; each generation draws fresh numbers.
            sampling = replace(sampling, seed=sampling.seed + self._generations)
        self._generations += 1
        processors = list(self.logits_processors)
        constraint = self.json_constraint()
        if constraint is not None:
            processors.append(constraint.processor())
        result = None
        for event in stream_generate(self.model, self.tokenizer, self.prompt_tokens(),
                                     max_tokens=self.max_tokens, sampling=sampling,
                                     logits_processors=processors, prompt_cache=self.cache):
            if isinstance(event, GenerationResult):
                result = event
            yield event
        return result

    def _run_tool(self, call: Message) -> str | None:
        """The tool's output for `call`; None when nobody can answer it."""
        recipient = call.recipient or ""
        name = ToolRegistry.function_name(recipient)
        if name is not None:
            tool = self.tools.tools.get(name)
            if tool is not None and tool.function is not None:
                return tool.run(call.text())
            if self.on_tool_call is not None:
                return self.on_tool_call(call)
            if name in self.tools:
                return None  # known but unimplemented: the caller answers it
            return self.tools.run(name, call.text())  # an unknown function: tell the model
        if recipient.split(".")[0] == "python":
            if self.python is None:
                return '{"error": "the python tool is not enabled"}'
            return self.python.run(call.text())
        if self.on_tool_call is not None:
            return self.on_tool_call(call)
        return f'{{"error": "no tool named {recipient} is available"}}'

    def close(self) -> None:
        if self.python is not None:
            self.python.close()

    def __enter__(self) -> "Chat":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _python_tool(python: bool | Any):
    if python is False or python is None:
        return None
    if python is True:
        from .tools.python import PythonTool

        return PythonTool()
    return python
