"""`POST /v1/responses` (streamed and not), and the stored responses behind `GET`/`DELETE`.

`ResponseBuilder` turns the harmony events of a generation into the Responses API's output
items and stream events, in OpenAI's order (`response.created` and `.in_progress` before the
prefill; per item `output_item.added`, `content_part.added`, deltas, `.done` events and
`output_item.done`; one terminal `response.completed`, `.incomplete` or `.failed`). A
non-streamed request runs the same builder and returns its final response object, so both
forms always agree. Mapping: analysis -> `reasoning` (raw text in `content`, `summary: []`);
final -> `message` (`phase: "final_answer"`); a commentary preamble -> `message`
(`phase: "commentary"`, never dropped); a call to `functions.X` on any channel ->
`function_call`. `output_index` counts items from 0 without gaps and `sequence_number` counts
events from 0.

Stored responses (`store`, default true) keep their harmony history, so `previous_response_id`
continues the conversation exactly (an unknown id is a 404); `instructions` are not carried
over, as OpenAI documents. The store is an in-memory LRU.
"""
from __future__ import annotations

import copy
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ..generate import GenerationResult
from ..harmony import Message, MessageEnd, MessageStart, TextDelta
from .convert import (
    BUILTIN_TOOL_TYPES,
    HistoryReader,
    Prompt,
    clamp_effort,
    encode_reasoning,
    function_name,
    item_kind,
    browser_action,
    reasoning_token_count,
    response_schema,
    responses_tools,
    tool_choice_of,
)
from .generation import BuiltinTools, Plan, ServerState, ToolRun, plan_generation, tool_rounds
from .protocol import APIError, bad_request, get, get_number, get_positive_int

STORE_CAPACITY = 1024
PYTHON_CONTAINER = "mlx-gptoss-python"  # the code_interpreter_call's container: the server's worker


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


# --------------------------------------------------------------------------- the store


@dataclass
class StoredResponse:
    response: dict[str, Any]
    history: list[Message]  # input and output, as harmony messages (no system/developer)
    call_names: dict[str, str]


class ResponseStore:
    """Responses by id, the least recently used forgotten past `capacity`."""

    def __init__(self, capacity: int = STORE_CAPACITY):
        self.capacity = capacity
        self.items: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, stored: StoredResponse) -> None:
        self.items[stored.response["id"]] = stored
        self.items.move_to_end(stored.response["id"])
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def get(self, response_id: str, param: str = "response_id") -> StoredResponse:
        stored = self.items.get(response_id)
        if stored is None:
            raise APIError(404, f"No response with id '{response_id}' is stored on this server",
                           param=param, code="not_found")
        self.items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self.items[response_id]


# --------------------------------------------------------------------------- the request


@dataclass
class ResponsesRequest:
    plan: Plan
    stream: bool
    store: bool
    include_reasoning: bool
    base: dict[str, Any]  # the response object's fixed fields
    call_names: dict[str, str]


def parse_request(state: ServerState, body: dict[str, Any]) -> ResponsesRequest:
    state.check_model(get(body, "model", "string", ""))
    reader = HistoryReader()
    previous_id = get(body, "previous_response_id", "string", "")
    if previous_id is not None:
        previous = state.store.get(previous_id, "previous_response_id")
        reader.history = list(previous.history)
        reader.call_names = dict(previous.call_names)
    if "input" not in body and previous_id is None:
        raise bad_request("missing required parameter 'input'", "input", "missing_required_parameter")
    if body.get("input") is not None:
        reader.responses_input(body["input"])
    if not reader.history:
        raise bad_request("'input' has nothing to answer", "input", "invalid_value")
    instructions = get(body, "instructions", "string", "")
    reasoning = get(body, "reasoning", "object", "", {})
    functions, builtins = responses_tools(body.get("tools"), state.builtin_tools)
    choice = tool_choice_of(body.get("tool_choice"), functions)
    text_format = get(get(body, "text", "object", "", {}), "format", "object", "text")
    schema, schema_name = response_schema(text_format, "text.format", nested=False)
    include = get(body, "include", "array", "", [])
    prompt = Prompt(history=reader.history,
                    instructions=[instructions] + reader.instructions if instructions else reader.instructions,
                    functions=[] if choice == "none" else functions,
                    effort=clamp_effort(reasoning.get("effort"), "reasoning.effort"),
                    response_schema=schema, response_name=schema_name,
                    builtins={name: state.builtin_namespaces[name] for name in sorted(builtins)})
    max_output = get_positive_int(body, "max_output_tokens", "")
    temperature = get_number(body, "temperature", "", 0, 2)
    top_p = get_number(body, "top_p", "", 0, 1)
    seed = get(body, "seed", "integer", "")
    knobs = {"tool_choice": choice, "temperature": temperature, "top_p": top_p, "seed": seed}
    plan = plan_generation(state, prompt, **knobs, max_tokens=max_output)
    sampling = plan.options["sampling"]
    base = {
        "object": "response", "model": state.served_name, "error": None,
        "incomplete_details": None, "instructions": instructions,
        "metadata": get(body, "metadata", "object", "", {}),
        "parallel_tool_calls": get(body, "parallel_tool_calls", "boolean", "", True),
        "temperature": sampling.temperature, "top_p": sampling.top_p,
        "tool_choice": body.get("tool_choice") or "auto", "tools": echoed_tools(body.get("tools"), functions, builtins),
        "max_output_tokens": max_output, "previous_response_id": previous_id,
        "reasoning": {"effort": prompt.effort, "summary": None},
        "store": get(body, "store", "boolean", "", True),
        "text": {"format": get(body, "text", "object", "", {}).get("format") or {"type": "text"}},
        "truncation": "disabled", "background": False, "usage": None,
    }
    return ResponsesRequest(plan, get(body, "stream", "boolean", "", False), base["store"],
                            "reasoning.encrypted_content" in include, base, reader.call_names)


def echoed_tools(tools: list | None, functions: list, builtins: set[str]) -> list[dict[str, Any]]:
    """The tools the response used: the functions (namespaces expanded) and the enabled
    built-ins; tools left out of the prompt are left out here too (and cannot trip a client's
    validation of the echo)."""
    out: list[dict[str, Any]] = [
        {"type": "function", "name": f.name, "description": f.description or None,
         "parameters": f.parameters or {"type": "object", "properties": {}}, "strict": False}
        for f in functions]
    for tool in tools or []:
        if isinstance(tool, dict) and BUILTIN_TOOL_TYPES.get(tool.get("type")) in builtins:
            extra = {"container": {"type": "auto"}} if tool["type"] == "code_interpreter" else {}
            out.append({**extra, **tool})
    return out


# --------------------------------------------------------------------------- the builder


@dataclass
class OpenItem:
    kind: str
    index: int
    item: dict[str, Any]
    recipient: str | None = None
    text: str = ""  # a built-in call's raw arguments


class ResponseBuilder:
    """Harmony events in, Responses stream events out; `response` is the full object."""

    def __init__(self, state: ServerState, request: ResponsesRequest):
        self.state = state
        self.request = request
        self.response = {"id": new_id("resp"), "created_at": int(time.time()),
                         "status": "in_progress", **copy.deepcopy(request.base), "output": []}
        self.sequence = 0
        self.open: OpenItem | None = None
        self.running: OpenItem | None = None  # a python call whose output is awaited
        self.call_names: dict[str, str] = {}
        self.usage = {"input": 0, "cached": 0, "output": 0, "reasoning": 0}
        self.history = list(request.plan.prompt.history)  # grows with built-in tool rounds
        self.tools = BuiltinTools(state)  # this response's tool sessions (its citable pages)

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        out = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return out

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.response)

    def start(self) -> list[dict[str, Any]]:
        return [self.event("response.created", response=self.snapshot()),
                self.event("response.in_progress", response=self.snapshot())]

    def feed(self, event: Any) -> list[dict[str, Any]]:
        if isinstance(event, MessageStart):
            return self._close() + self._open(event.channel, event.recipient)
        if isinstance(event, TextDelta) and self.open is not None:
            delta = self._delta(event.text)
            return [] if delta is None else [delta]
        if isinstance(event, MessageEnd):
            out = [] if self.open is not None else self._open(event.message.channel,
                                                              event.message.recipient)
            return out + self._close(event.message.text(), event.stop)
        return []

    def _open(self, channel: str | None, recipient: str | None) -> list[dict[str, Any]]:
        kind = item_kind(channel, recipient, self.request.plan.prompt.builtins)
        index = len(self.response["output"])
        if kind in ("python_call", "browser_call"):
            if kind == "python_call":
                item = {"id": new_id("ci"), "type": "code_interpreter_call", "code": "",
                        "container_id": PYTHON_CONTAINER, "outputs": None, "status": "in_progress"}
            else:
                item = {"id": new_id("ws"), "type": "web_search_call",
                        "action": {"type": "search", "query": ""}, "status": "in_progress"}
            self.response["output"].append(item)
            self.open = OpenItem(kind, index, item, recipient)
            return [self.event("response.output_item.added", output_index=index, item=copy.deepcopy(item)),
                    self.event(f"response.{item['type']}.in_progress", item_id=item["id"],
                               output_index=index)]
        if kind == "reasoning":
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                    "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        elif kind == "message":
            item = {"id": new_id("msg"), "type": "message", "role": "assistant",
                    "status": "in_progress", "content": [],
                    "phase": "commentary" if channel == "commentary" else "final_answer"}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            kind = "function_call"
            item = {"id": new_id("fc"), "type": "function_call", "call_id": new_id("call"),
                    "name": function_name(recipient), "arguments": "", "status": "in_progress"}
            part = None
        self.response["output"].append(item)
        self.open = OpenItem(kind, index, item)
        out = [self.event("response.output_item.added", output_index=index, item=copy.deepcopy(item))]
        if part is not None:
            item["content"].append(part)
            out.append(self.event("response.content_part.added", item_id=item["id"],
                                  output_index=index, content_index=0, part=dict(part)))
        return out

    def _delta(self, text: str) -> dict[str, Any] | None:
        item, index = self.open.item, self.open.index
        if self.open.kind == "browser_call":  # OpenAI streams no browser arguments
            self.open.text += text
            return None
        if self.open.kind == "python_call":
            item["code"] += text
            return self.event("response.code_interpreter_call_code.delta", item_id=item["id"],
                              output_index=index, delta=text)
        if self.open.kind == "function_call":
            item["arguments"] += text
            return self.event("response.function_call_arguments.delta", item_id=item["id"],
                              output_index=index, delta=text)
        item["content"][0]["text"] += text
        if self.open.kind == "reasoning":
            return self.event("response.reasoning_text.delta", item_id=item["id"],
                              output_index=index, content_index=0, delta=text)
        return self.event("response.output_text.delta", item_id=item["id"], output_index=index,
                          content_index=0, delta=text, logprobs=[])

    def _close(self, text: str | None = None, stop: str = "eos") -> list[dict[str, Any]]:
        """Finish the open item (with the message's full text when the parser gave it)."""
        if self.open is None:
            return []
        kind, index, item = self.open.kind, self.open.index, self.open.item
        ids = {"item_id": item["id"], "output_index": index}
        builtin = kind in ("python_call", "browser_call")
        if builtin and self.running is None and stop == "call":  # complete: the server runs it
            self.running = self.open
            if kind == "browser_call":
                item["action"] = browser_action(self.open.recipient, self.open.text if text is None else text)
                item["status"] = "searching"
                return [self.event("response.web_search_call.searching", **ids)]
            item["code"] = item["code"] if text is None else text
            item["status"] = "interpreting"
            return [self.event("response.code_interpreter_call_code.done", **ids, code=item["code"]),
                    self.event("response.code_interpreter_call.interpreting", **ids)]
        self.open = None
        item["status"] = "completed" if stop in ("end", "call", "return") else "incomplete"
        if builtin:
            self.running = None
            return [self.event(f"response.{item['type']}.completed", **ids),
                    self.event("response.output_item.done", output_index=index, item=copy.deepcopy(item))]
        if kind == "function_call":
            item["arguments"] = item["arguments"] if text is None else text
            self.call_names[item["call_id"]] = item["name"]
            return [self.event("response.function_call_arguments.done", **ids,
                               name=item["name"], arguments=item["arguments"]),
                    self.event("response.output_item.done", output_index=index, item=copy.deepcopy(item))]
        part = item["content"][0]
        part["text"] = part["text"] if text is None else text
        if kind == "reasoning":
            if self.request.include_reasoning:
                item["encrypted_content"] = encode_reasoning(part["text"])
            done = self.event("response.reasoning_text.done", **ids, content_index=0, text=part["text"])
            added = []
        else:
            part["annotations"] = self.tools.citations(part["text"])
            added = [self.event("response.output_text.annotation.added", **ids, content_index=0,
                                annotation_index=i, annotation=dict(annotation))
                     for i, annotation in enumerate(part["annotations"])]
            done = self.event("response.output_text.done", **ids, content_index=0,
                              text=part["text"], logprobs=[])
        return [*added, done,
                self.event("response.content_part.done", **ids, content_index=0, part=dict(part)),
                self.event("response.output_item.done", output_index=index, item=copy.deepcopy(item))]

    def tool_output(self, output: str) -> list[dict[str, Any]]:
        """A built-in tool answered the open call: close its item (python's with the logs;
        OpenAI's web_search_call carries no page text)."""
        if self.running is None:  # the call was never opened as a built-in item
            return []
        if self.running.kind == "python_call":
            self.running.item["outputs"] = [{"type": "logs", "logs": output}]
        return self._close(None, "call")

    def count(self, result: GenerationResult) -> None:
        """Add one generation round's tokens to the usage."""
        self.usage["input"] += result.stats.prompt_tokens
        self.usage["cached"] += result.stats.cached_tokens
        self.usage["output"] += len(result.tokens)
        self.usage["reasoning"] += reasoning_token_count(self.state.tokenizer, result.tokens)

    def finish(self, result: GenerationResult) -> list[dict[str, Any]]:
        out = self._close()
        used = self.usage
        self.response["usage"] = {
            "input_tokens": used["input"],
            "input_tokens_details": {"cached_tokens": used["cached"], "cache_write_tokens": 0},
            "output_tokens": used["output"],
            "output_tokens_details": {"reasoning_tokens": used["reasoning"]},
            "total_tokens": used["input"] + used["output"],
        }
        if result.stop == "length":
            self.response["status"] = "incomplete"
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
            terminal = "response.incomplete"
        else:
            self.response["status"] = "completed"
            terminal = "response.completed"
        if self.request.store:
            history = self.history + list(result.messages)
            self.state.store.put(StoredResponse(self.snapshot(), history,
                                                {**self.request.call_names, **self.call_names}))
        return out + [self.event(terminal, response=self.snapshot())]

    def fail(self, error: APIError) -> list[dict[str, Any]]:
        out = self._close()
        self.response["status"] = "failed"
        self.response["error"] = {"code": error.code or "server_error", "message": error.message}
        return out + [self.event("response.failed", response=self.snapshot())]


def as_api_error(error: BaseException) -> APIError:
    """What a client is told about a failed generation (never a traceback)."""
    if isinstance(error, APIError):
        return error
    from ..errors import GptOssError

    if isinstance(error, GptOssError):
        return APIError(400, str(error), code="invalid_prompt")
    return APIError(500, "the generation failed on the server (see its log)", type="server_error",
                    code="server_error")


async def run_events(state: ServerState, request: ResponsesRequest, http_request: Any
                     ) -> AsyncIterator[dict[str, Any]]:
    """The whole event sequence of one response (started now: 429 raises before any event)."""
    stream = state.worker.start(request.plan.ids, **request.plan.options)
    return _events(state, ResponseBuilder(state, request), stream, http_request)


async def _events(state: ServerState, builder: ResponseBuilder, stream, http_request
                  ) -> AsyncIterator[dict[str, Any]]:
    """Stream a generation's events, with the built-in tools the server runs (python,
    browser) answering their calls between rounds (`tool_rounds`). Each response gets fresh
    tool sessions, closed after its last event (the final answer's citations need the pages)."""
    for event in builder.start():
        yield event
    tools = builder.tools
    result = None
    try:
        async for event in tool_rounds(state, builder.request.plan, stream, tools, http_request):
            if isinstance(event, GenerationResult):
                result = event
                builder.count(result)
            elif isinstance(event, ToolRun):
                for out in builder.tool_output("\n".join(m.text() for m in event.replies)):
                    yield out
                builder.history += [*event.messages, *event.replies]
                result = None
            else:
                for out in builder.feed(event):
                    yield out
        if result is None:  # cancelled: the client is gone
            for out in builder.fail(APIError(499, "the request was cancelled", code="cancelled")):
                yield out
            return
        for out in builder.finish(result):
            yield out
    except Exception as e:  # noqa: BLE001 - reported to this client as response.failed
        for out in builder.fail(as_api_error(e)):
            yield out
    finally:
        tools.close()
