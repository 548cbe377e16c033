"""What both APIs share: the server's state and a request's generation plan.

`plan_generation` turns a `Prompt` and the request's knobs into the token ids and the
`stream_generate` keywords: sampling, the output limit (the rest of the context unless the
client sets one), and the constraint that makes the guarantees (`JsonSchemaConstraint`): a JSON
Schema on the final answer only (the analysis stays free, within a budget that leaves room for
the answer), valid arguments for every function call, and a call for `tool_choice` "required"
or a named function. Everything a client can get wrong fails here, before anything is admitted.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable

from ..agent import render_turn
from ..constrained import JsonSchemaConstraint
from ..errors import GptOssError, HarmonyError, SchemaError
from ..generate import GenerationResult
from ..harmony import HarmonyTokenizer, Message
from ..sampling import SamplingParams
from ..tools.browser import BrowserTool
from .convert import BUILTIN_CALLS, Prompt, item_kind
from .protocol import APIError, bad_request
from .worker import Worker

DEFAULT_CONTEXT = 131072


@dataclass
class ServerState:
    """What every request handler needs; one per app."""

    model: Any
    tokenizer: HarmonyTokenizer
    worker: Worker
    served_name: str
    # Built-in tools the server runs (--python, --browser): name -> a fresh tool per response,
    # and the namespace each declares in the system message.
    builtin_tools: dict[str, Callable[[], Any]] = field(default_factory=dict)
    builtin_namespaces: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    max_body_bytes: int = 16 * 2**20
    created: int = 0
    store: Any = None  # responses.ResponseStore
    trusted_hosts: tuple[str, ...] | None = None  # Host headers answered (None: any)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def context_length(self) -> int:
        return int(getattr(getattr(self.model, "config", None), "max_position_embeddings", DEFAULT_CONTEXT))

    def check_model(self, name: Any) -> None:
        if name is None:
            return
        if name != self.served_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                                f"'{self.served_name}'", param="model", code="model_not_found")


@dataclass
class Plan:
    prompt: Prompt
    ids: list[int]
    options: dict[str, Any]
    max_tokens: int
    knobs: dict[str, Any] = field(default_factory=dict)  # plan_generation's keywords

    def replan(self, state: "ServerState", history: list[Message], max_tokens: int) -> "Plan":
        """The same request over a longer history (after a built-in tool answered)."""
        prompt = replace(self.prompt, history=history)
        return plan_generation(state, prompt, **{**self.knobs, "max_tokens": max_tokens})


def plan_generation(state: ServerState, prompt: Prompt, *, tool_choice: Any = "auto",
                    temperature: float | None = None,
                    top_p: float | None = None, seed: int | None = None,
                    max_tokens: int | None = None, schema_param: str = "text.format") -> Plan:
    """Render `prompt` and build the generation keywords (see the module docstring)."""
    tok = state.tokenizer
    try:
        ids = render_turn(tok, prompt.messages())  # the agent loop's rendering (CoT rule)
    except HarmonyError as e:
        raise bad_request(f"the conversation cannot be rendered: {e}") from None
    room = state.context_length - len(ids)
    if room < 1:
        raise bad_request(f"the prompt has {len(ids)} tokens; the context holds "
                          f"{state.context_length}", "input", "context_length_exceeded")
    limit = room if max_tokens is None else min(max_tokens, room)
    functions = [] if tool_choice == "none" else prompt.functions
    processors: list[Any] = []
    if prompt.response_schema is not None or functions:
        try:
            constraint = JsonSchemaConstraint.from_schema(
                tok, prompt.response_schema, tools=functions,
                tool_choice="auto" if tool_choice == "none" else tool_choice)
        except SchemaError as e:
            param = schema_param if "response format" in str(e) else "tools"
            raise bad_request(str(e), param, "invalid_json_schema") from None
        processors.append(constraint.processor(ids, max_tokens=limit))
    if seed is not None and not 0 <= seed < 2**64:
        raise bad_request(f"'seed' must be in [0, 2**64), got {seed}", "seed", "invalid_value")
    base = getattr(state.model, "sampling_defaults", None) or SamplingParams()
    try:
        sampling = base.with_overrides(temperature=temperature, top_p=top_p, seed=seed)
    except GptOssError as e:
        raise bad_request(str(e), None, "invalid_value") from None
    options = {"max_tokens": limit, "sampling": sampling, "logits_processors": processors}
    knobs = {"tool_choice": tool_choice, "temperature": temperature, "top_p": top_p, "seed": seed,
             "schema_param": schema_param}
    return Plan(prompt, ids, options, limit, knobs)


async def watch_disconnect(request: Any, on_disconnect) -> None:
    """Call `on_disconnect()` when the client goes away (the ASGI `http.disconnect` message)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            on_disconnect()
            return


async def guarded(request: Any, stream, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """`events`, with the generation cancelled as soon as the client disconnects."""
    watcher = asyncio.create_task(watch_disconnect(request, stream.cancel))
    try:
        async for item in events:
            yield item
    finally:
        watcher.cancel()
        stream.cancel()


# --------------------------------------------------------------------------- built-in tools

MAX_TOOL_ROUNDS = 8  # built-in tool calls per response


class BuiltinTools:
    """The built-in tool sessions of one response: each made on first use, all closed at the
    end, so a response sees only its own pages (its citations cite nothing another opened)."""

    def __init__(self, state: ServerState):
        self.state = state
        self.tools: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        if name not in self.tools:
            self.tools[name] = self.state.builtin_tools[name]()
        return self.tools[name]

    def citations(self, text: str) -> list[dict[str, Any]]:
        """`url_citation` annotations (Responses shape) for the markers of `text` that cite a
        page this response's browser opened; none when the browser did not run."""
        browser = self.tools.get("browser")
        if not isinstance(browser, BrowserTool):
            return []
        return [c.to_dict() for c in browser.citations(text)]

    def close(self) -> None:
        for tool in self.tools.values():
            tool.close()
        self.tools.clear()


@dataclass
class ToolRun:
    """A built-in tool answered the call that ended a generation round."""

    messages: list[Message]  # the round's messages, the call last
    replies: list[Message]


async def tool_rounds(state: ServerState, plan: Plan, stream, tools: BuiltinTools, http_request
                      ) -> AsyncIterator[Any]:
    """The harmony events and `GenerationResult` of each generation round; while a round ends
    in a complete call to one of the prompt's built-in tools, run it (a `ToolRun`) and generate
    again over the call and its reply, at most `MAX_TOOL_ROUNDS` times and `plan.max_tokens`
    output tokens in all. Ends early, with no result, when the client goes away."""
    history, used = list(plan.prompt.history), 0
    for rounds in range(MAX_TOOL_ROUNDS + 1):
        result = None
        events = guarded(http_request, stream, stream.events())
        try:
            async for event in events:
                if isinstance(event, GenerationResult):
                    result = event
                yield event
        finally:  # also when our consumer stops early: the generation is cancelled now
            await events.aclose()
        if result is None:
            return
        used += len(result.tokens)
        left = plan.max_tokens - used
        call = result.messages[-1] if result.messages else None
        if (result.stop != "call" or call is None or rounds == MAX_TOOL_ROUNDS or left < 1
                or item_kind(call.channel, call.recipient, plan.prompt.builtins) not in BUILTIN_CALLS):
            return
        tool = tools.get(call.recipient.split(".", 1)[0])
        replies = await asyncio.to_thread(tool.process, call)
        yield ToolRun(list(result.messages), replies)
        history += [*result.messages, *replies]
        next_plan = plan.replan(state, history, left)
        stream = state.worker.start(next_plan.ids, admitted=True, **next_plan.options)


def sse(data: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"
