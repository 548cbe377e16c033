"""`POST /v1/chat/completions` (streamed and not), harmony-native.

Mapping: analysis -> `reasoning` (in `message` and in `delta`; `reasoning` or
`reasoning_content` read back on input), the final answer and commentary preambles ->
`content`, calls to `functions.X` on any channel -> `tool_calls`. In a stream, `role` comes once
in the first chunk, a tool call's `id`, `type` and `name` once in its first chunk and its
arguments after, and with `stream_options.include_usage` a last chunk carries the usage and
`choices: []` (the openai SDK's `.stream()` accumulates every string field, so nothing is sent
twice). `stop` strings end the answer at their first occurrence and are not returned.
`reasoning_effort` outside low/medium/high is clamped (none/minimal -> low, xhigh/max -> high).

With `web_search_options` (OpenAI's Chat switch for web search) and a server started with the
browser, the server runs the model's `browser.*` calls itself (hidden from the client, as
OpenAI's are) and the message carries `annotations` (`{type: "url_citation", url_citation:
{start_index, end_index, url, title}}`) for the `【cursor†Lx-Ly】` markers of `content` that
cite a page the browser opened; a stream sends them in one delta after the content.
"""
from __future__ import annotations

import logging
import secrets
import time
from typing import Any, AsyncIterator

from ..generate import GenerationResult
from ..harmony import MessageEnd, MessageStart, TextDelta
from .convert import (
    BUILTIN_CALLS,
    HistoryReader,
    Prompt,
    chat_tools,
    clamp_effort,
    function_name,
    item_kind,
    reasoning_token_count,
    response_schema,
    tool_choice_of,
)
from .generation import BuiltinTools, Plan, ServerState, ToolRun, plan_generation, tool_rounds
from .protocol import bad_request, get, get_number, get_positive_int
from .responses import as_api_error

log = logging.getLogger("mlx_gptoss.server")


def parse_request(state: ServerState, body: dict[str, Any]) -> tuple[Plan, dict[str, Any]]:
    """The plan and the knobs the output needs (stream, include_usage, stop strings)."""
    state.check_model(get(body, "model", "string", ""))
    n = get(body, "n", "integer", "", 1)
    if n != 1:
        raise bad_request("only n=1 is supported", "n", "unsupported_value")
    reader = HistoryReader()
    reader.chat_messages(body.get("messages"))
    functions = chat_tools(body.get("tools"))
    choice = tool_choice_of(body.get("tool_choice"), functions)
    schema, name = response_schema(get(body, "response_format", "object", ""), "response_format",
                                   nested=True)
    browse = get(body, "web_search_options", "object", "") is not None
    if browse and "browser" not in state.builtin_tools:
        log.warning("web_search_options: the browser is not enabled on this server (--browser); ignored")
        browse = False
    prompt = Prompt(history=reader.history, instructions=reader.instructions,
                    functions=[] if choice == "none" else functions,
                    effort=clamp_effort(body.get("reasoning_effort"), "reasoning_effort"),
                    response_schema=schema, response_name=name,
                    builtins={"browser": state.builtin_namespaces["browser"]} if browse else {})
    max_tokens = get_positive_int(body, "max_completion_tokens", "") or get_positive_int(body, "max_tokens", "")
    plan = plan_generation(state, prompt, tool_choice=choice,
                           temperature=get_number(body, "temperature", "", 0, 2),
                           top_p=get_number(body, "top_p", "", 0, 1),
                           seed=get(body, "seed", "integer", ""), max_tokens=max_tokens,
                           schema_param="response_format")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise bad_request("'stop' must be a string or up to 4 non-empty strings", "stop", "invalid_value")
    options = get(body, "stream_options", "object", "", {})
    knobs = {"stream": get(body, "stream", "boolean", "", False), "stop": stop,
             "include_usage": bool(options.get("include_usage"))}
    return plan, knobs


class StopMatcher:
    """Finds `stop` strings across deltas, holding back text that may start one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        full = self.pending + text
        hits = [i for i in (full.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return full[:min(hits)]
        hold = max((k for s in self.stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
        self.pending = full[len(full) - hold:] if hold else ""
        return full[:len(full) - hold]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ChatBuilder:
    """Harmony events in, chunk deltas out; also accumulates the whole message."""

    def __init__(self, state: ServerState, plan: Plan, stops: list[str]):
        self.state = state
        self.builtins = plan.prompt.builtins
        self.tools = BuiltinTools(state)  # this completion's tool sessions (its citable pages)
        self.results: list[GenerationResult] = []  # one per generation round
        self.annotations: list[dict[str, Any]] = []  # Chat's `url_citation`s, set by `flush`
        self.stop = StopMatcher(stops)
        self.kind: str | None = None
        self.reasoning: list[str] = []
        self.content = ""
        self.tool_calls: list[dict[str, Any]] = []
        self.role_sent = False
        self._reasoning_parts = 0

    def feed(self, event: Any) -> list[dict[str, Any]]:
        """Deltas for one harmony event."""
        if isinstance(event, MessageStart):
            return self._start(event.channel, event.recipient)
        if isinstance(event, TextDelta) and self.kind is not None:
            return self._text(event.text)
        if isinstance(event, MessageEnd):
            out = self._start(event.message.channel, event.message.recipient) if self.kind is None else []
            self.kind = None
            return out
        return []

    def _start(self, channel: str | None, recipient: str | None) -> list[dict[str, Any]]:
        self.kind = item_kind(channel, recipient, self.builtins)
        if self.kind in BUILTIN_CALLS:  # run by the server, unseen by the client
            return []
        if self.kind == "function_call":
            call = {"index": len(self.tool_calls), "id": f"call_{secrets.token_hex(12)}",
                    "type": "function", "function": {"name": function_name(recipient), "arguments": ""}}
            self.tool_calls.append(call)
            return [{"tool_calls": [{**call, "function": dict(call["function"])}]}]
        if self.kind == "reasoning":
            self.reasoning.append("")
            if len(self.reasoning) > 1:  # several analysis messages read as one, line by line
                return [{"reasoning": "\n"}]
        elif self.content and not self.stop.stopped:  # a preamble, then the answer
            self.content += "\n\n"
            return [{"content": "\n\n"}]
        return []

    def _text(self, text: str) -> list[dict[str, Any]]:
        if self.kind in BUILTIN_CALLS:
            return []
        if self.kind == "function_call":
            call = self.tool_calls[-1]
            call["function"]["arguments"] += text
            return [{"tool_calls": [{"index": call["index"], "function": {"arguments": text}}]}]
        if self.kind == "reasoning":
            self.reasoning[-1] += text
            return [{"reasoning": text}]
        if self.stop.stopped:
            return []
        text = self.stop.feed(text)
        self.content += text
        return [{"content": text}] if text else []

    def flush(self) -> list[dict[str, Any]]:
        """The held-back tail of the content, then the annotations of the whole content."""
        tail = "" if self.stop.stopped else self.stop.flush()
        self.content += tail
        out = [{"content": tail}] if tail else []
        self.annotations = [{"type": "url_citation", "url_citation": {
            k: v for k, v in a.items() if k != "type"}} for a in self.tools.citations(self.content)]
        return out + ([{"annotations": self.annotations}] if self.annotations else [])

    def finish_reason(self, result: GenerationResult | None) -> str:
        if self.tool_calls:
            return "tool_calls"
        if self.stop.stopped:
            return "stop"
        return "length" if result is not None and result.stop == "length" else "stop"

    def message(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "assistant", "content": self.content or (None if self.tool_calls else ""),
                               "refusal": None}
        if self.reasoning:
            out["reasoning"] = "\n".join(self.reasoning)
        if self.tool_calls:
            out["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in self.tool_calls]
        if self.annotations:
            out["annotations"] = self.annotations
        return out

    def usage(self, result: GenerationResult | None) -> dict[str, Any] | None:
        """Every generation round's tokens (a browsing answer has several)."""
        if result is None:
            return None
        prompt = sum(r.stats.prompt_tokens for r in self.results)
        tokens = [t for r in self.results for t in r.tokens]
        return {"prompt_tokens": prompt, "completion_tokens": len(tokens),
                "total_tokens": prompt + len(tokens),
                "prompt_tokens_details": {"cached_tokens": sum(r.stats.cached_tokens for r in self.results)},
                "completion_tokens_details": {"reasoning_tokens": sum(
                    reasoning_token_count(self.state.tokenizer, r.tokens) for r in self.results)}}


def _head(state: ServerState) -> dict[str, Any]:
    return {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()),
            "model": state.served_name, "system_fingerprint": None}


async def _generation(builder: ChatBuilder, plan: Plan, stream, http_request) -> AsyncIterator[Any]:
    """Deltas, then ("done", result of the last round); a `stop` string ends the generation
    early. The built-in tools run between rounds (`tool_rounds`) and are closed at the end."""
    result = None
    rounds = tool_rounds(builder.state, plan, stream, builder.tools, http_request)
    try:
        async for event in rounds:
            if isinstance(event, GenerationResult):
                result = event
                builder.results.append(event)
            elif isinstance(event, ToolRun):
                result = None
            else:
                for delta in builder.feed(event):
                    yield delta
            if builder.stop.stopped:  # closing the rounds cancels the generation
                result = None
                break
        for delta in builder.flush():
            yield delta
    finally:
        await rounds.aclose()
        builder.tools.close()
    yield ("done", result)


async def complete(state: ServerState, plan: Plan, knobs: dict[str, Any], http_request
                   ) -> dict[str, Any]:
    stream = state.worker.start(plan.ids, **plan.options)
    builder = ChatBuilder(state, plan, knobs["stop"])
    result = None
    try:
        async for item in _generation(builder, plan, stream, http_request):
            if isinstance(item, tuple):
                result = item[1]
    except Exception as e:  # noqa: BLE001 - this request's failure, as an OpenAI error
        raise as_api_error(e) from None
    if result is None and not builder.stop.stopped:
        raise as_api_error(RuntimeError("cancelled"))
    return {**_head(state), "object": "chat.completion",
            "choices": [{"index": 0, "message": builder.message(), "logprobs": None,
                         "finish_reason": builder.finish_reason(result)}],
            "usage": builder.usage(result)}


async def stream_chunks(state: ServerState, plan: Plan, knobs: dict[str, Any], http_request
                        ) -> AsyncIterator[dict[str, Any]]:
    """Started now (429 raises here); returns the chunk iterator."""
    stream = state.worker.start(plan.ids, **plan.options)
    return _chunks(state, plan, ChatBuilder(state, plan, knobs["stop"]), stream, knobs, http_request)


async def _chunks(state, plan, builder, stream, knobs, http_request) -> AsyncIterator[dict[str, Any]]:
    head = {**_head(state), "object": "chat.completion.chunk"}
    extra = {"usage": None} if knobs["include_usage"] else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}], **extra}

    yield chunk({"role": "assistant", "content": ""})
    result = None
    try:
        async for item in _generation(builder, plan, stream, http_request):
            if isinstance(item, tuple):
                result = item[1]
            else:
                yield chunk(item)
    except Exception as e:  # noqa: BLE001 - the SDK raises APIError on a top-level "error"
        yield as_api_error(e).body()
        return
    yield chunk({}, builder.finish_reason(result))
    if knobs["include_usage"]:
        yield {**head, "choices": [], "usage": builder.usage(result)}
