"""The agent turn loop: one assistant turn, tools included, with no state of its own.

`run_turn(generate, header, history, router=...)` renders the conversation, generates, and
while the model calls a tool that `router` can answer, appends the call and the tool's replies
and generates again; it yields the harmony events, each round's `GenerationResult`, each
`ToolResult`, and last a `Reply` with the turn's new messages and why it stopped. A call the
router cannot answer (a function with no implementation: the client's, the user's) ends the
turn with `stop == "call"`: the caller answers it and runs the loop again.

`generate(prompt_ids)` is whatever produces the events: `stream_generate` over a prompt cache
(`Chat`, the CLI) or `Engine.stream_generate` (the server). The router is anything with
`process(call) -> list[Message]` (`mlx_gptoss.tools.ToolRouter`); an empty list means "not mine
to answer".

Chain of thought: by default the prompt leaves out the analysis of every turn that already ended
in a final answer and keeps the analysis inside the current, unfinished turn (between tool
calls), as the harmony format documents (`TURN_RENDER`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, Sequence

from .defaults import DEFAULT_TOOL_ROUNDS
from .generate import GenerationResult
from .harmony import (
    Conversation,
    Event,
    HarmonyTokenizer,
    Message,
    RenderConversationConfig,
    Role,
    render_conversation_for_completion,
)
from .harmony.constants import (
    ANALYSIS,
    FINAL,
    STOP_CALL,
    STOP_INVALID_CALL,
    STOP_TOOL_ROUNDS,
)

TURN_RENDER = RenderConversationConfig(auto_drop_analysis=True, drop_finished_turns=True)


class Router(Protocol):
    def process(self, call: Message) -> list[Message]: ...


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
        finals = [m for m in self.messages if m.author.role is Role.ASSISTANT and m.channel == FINAL]
        return finals[-1].text() if finals else ""

    @property
    def reasoning(self) -> str:
        return "\n".join(m.text() for m in self.messages if m.channel == ANALYSIS
                         and m.author.role is Role.ASSISTANT and m.recipient is None)

    @property
    def tool_calls(self) -> list[Message]:
        return [m for m in self.messages if m.author.role is Role.ASSISTANT and m.recipient]

    @property
    def complete(self) -> bool:
        """False when max_tokens cut off a constrained answer (see `GenerationResult`)."""
        return all(g.complete for g in self.generations)

    def __str__(self) -> str:
        return self.text


TurnEvent = Event | GenerationResult | ToolResult | Reply


def render_turn(tokenizer: HarmonyTokenizer, messages: Sequence[Message],
                config: RenderConversationConfig = TURN_RENDER) -> list[int]:
    """The prompt of the next round: the conversation so far, for the assistant to continue."""
    return render_conversation_for_completion(Conversation(list(messages)), Role.ASSISTANT,
                                              config, tokenizer)


def run_turn(generate: Callable[[list[int]], Iterable[Event | GenerationResult]],
             tokenizer: HarmonyTokenizer, header: Sequence[Message],
             history: Sequence[Message], *, router: Router | None = None,
             max_tool_rounds: int = DEFAULT_TOOL_ROUNDS,
             render_config: RenderConversationConfig = TURN_RENDER) -> Iterator[TurnEvent]:
    """Drive one assistant turn after `header + history` (see the module docstring).

    Nothing passed in is modified; the `Reply` holds the messages the turn added. An exception
    (Ctrl-C, a closed stream) propagates with nothing half-done to undo."""
    if max_tool_rounds < 0:
        raise ValueError(f"max_tool_rounds must be >= 0, got {max_tool_rounds}")
    added: list[Message] = []
    generations: list[GenerationResult] = []
    rounds = 0
    while True:
        ids = render_turn(tokenizer, [*header, *history, *added], render_config)
        result = None
        for event in generate(ids):
            if isinstance(event, GenerationResult):
                result = event
            yield event
        generations.append(result)
        added.extend(result.messages)
        if result.stop != STOP_CALL:
            stop = result.stop
            break
        if rounds >= max_tool_rounds:
            stop = STOP_TOOL_ROUNDS
            break
        rounds += 1
        call = result.messages[-1] if result.messages else None
        if call is None or not call.recipient:  # <|call|> closed a message to nobody
            stop = STOP_INVALID_CALL
            break
        replies = router.process(call) if router is not None else []
        if not replies:
            stop = STOP_CALL
            break
        added.extend(replies)
        for reply in replies:
            yield ToolResult(call, reply)
    yield Reply(added, stop, generations)
