"""API shapes <-> harmony: request items and messages to `Message`s, model messages to items.

Both APIs are read into one `Prompt`: the history as harmony messages plus what goes into the
system and developer messages (instructions, function tools, response format, effort). The
history is rendered the way the model was trained (`agent.TURN_RENDER`): the analysis of finished
turns is dropped, the analysis inside an unfinished tool chain is kept. All user, tool and
instruction text goes through the renderer's ordinary-text encoding, so `<|start|>` typed by a
client is plain text, never a control token.

Tool types the server does not serve (Codex CLI's `custom`, `local_shell`, `tool_search`, ...)
are accepted and left out of the prompt with a warning: a 400 there would break every turn of
an agent. Input items may carry ids and statuses; they are content, never looked up.

The chain of thought travels statelessly in a reasoning item's `encrypted_content` when the
client asks for it (`include: ["reasoning.encrypted_content"]`, Codex with `store: false`): an
opaque, versioned, base64 encoding of the text. It is not encryption (the server has no secret
to keep); it is what lets a stateless client hand the reasoning back in the next request.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..constrained import allowed_tools_of, function_named, response_format_of
from ..errors import SchemaError
from ..prompts import developer_message, system_message
from ..harmony import (
    Author,
    HarmonyTokenizer,
    Message,
    Role,
    StreamParser,
    TextContent,
    ToolDescription,
    ToolNamespaceConfig,
)
from ..tools.functions import _NAME as FUNCTION_NAME
from ..tools.functions import NAMESPACE
from .protocol import bad_request, get

log = logging.getLogger("mlx_gptoss.server")

JSON_CONTENT_TYPE = "<|constrain|>json"
REASONING_PREFIX = "mlxgptoss.v1:"
EFFORTS = ("low", "medium", "high")
# What API reasoning efforts mean for gpt-oss, which knows only low, medium and high.
EFFORT_CLAMP = {"none": "low", "minimal": "low", "low": "low", "medium": "medium",
                "high": "high", "xhigh": "high", "max": "high"}
BUILTIN_TOOL_TYPES = {"web_search": "browser", "web_search_preview": "browser",
                      "browser_search": "browser", "code_interpreter": "python"}
BUILTIN_ITEMS = {"python": "code_interpreter_call", "browser": "web_search_call"}
BUILTIN_CALLS = ("python_call", "browser_call")  # `item_kind`s of calls the server runs


@dataclass
class Prompt:
    """Everything a generation needs to know about the conversation."""

    history: list[Message] = field(default_factory=list)
    instructions: list[str] = field(default_factory=list)
    functions: list[ToolDescription] = field(default_factory=list)
    effort: str = "medium"
    response_schema: Any = None  # a JSON Schema the final answer must satisfy
    response_name: str | None = None
    # The built-in tools declared in the system message (and run by the server), by name.
    builtins: dict[str, ToolNamespaceConfig] = field(default_factory=dict)

    def messages(self) -> list[Message]:
        """system, developer (when it has something to say), then the history."""
        system = system_message(reasoning_effort=self.effort)
        for namespace in self.builtins.values():  # each tool's own text (true timeout, ...)
            system.content[0].with_tools(namespace)
        out = [system]
        fmt = None
        if self.response_schema is not None:
            fmt = response_format_of(self.response_schema, self.response_name)
        dev = developer_message("\n\n".join(self.instructions) or None, self.functions, fmt)
        if dev is not None:
            out.append(dev)
        return out + self.history


def response_schema(fmt: dict[str, Any] | None, param: str, nested: bool) -> tuple[Any, str | None]:
    """(schema, name) from a response format, or (None, None) for plain text. Responses puts
    `name`/`schema` in `text.format` itself; Chat nests them under `json_schema`."""
    if fmt is None or fmt.get("type", "text") == "text":
        return None, None
    if fmt.get("type") == "json_object":
        return {"type": "object"}, "json_object"
    if fmt.get("type") == "json_schema":
        where = f"{param}.json_schema" if nested else param
        spec = get(fmt, "json_schema", "object", param, required=True) if nested else fmt
        schema = spec.get("schema", {} if nested else None)
        if not isinstance(schema, (dict, bool)):
            raise bad_request(f"'{where}.schema' must be a JSON Schema object", f"{where}.schema",
                              "invalid_type")
        return schema, get(spec, "name", "string", where)
    raise bad_request(f"'{param}.type' must be text, json_object or json_schema, got "
                      f"{fmt.get('type')!r}", f"{param}.type", "invalid_value")


def clamp_effort(value: Any, param: str) -> str:
    """An API effort as gpt-oss's: none/minimal -> low, xhigh/max -> high."""
    if value is None:
        return "medium"  # Codex omits it for gpt-oss; medium is the model card's default
    if not isinstance(value, str) or value.lower() not in EFFORT_CLAMP:
        raise bad_request(f"'{param}' must be one of {', '.join(EFFORT_CLAMP)}, got {value!r}",
                          param, "invalid_value")
    return EFFORT_CLAMP[value.lower()]


# --------------------------------------------------------------------------- tools


def function_description(name: Any, description: Any, parameters: Any, param: str) -> ToolDescription:
    if not isinstance(name, str) or not FUNCTION_NAME.match(name):
        raise bad_request(f"'{param}.name' must be a function name (letters, digits, _ and -), "
                          f"got {name!r}", f"{param}.name", "invalid_value")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"'{param}.description' must be a string", f"{param}.description")
    if parameters is not None and not isinstance(parameters, (dict, bool)):
        raise bad_request(f"'{param}.parameters' must be a JSON Schema object",
                          f"{param}.parameters")
    schema = parameters if isinstance(parameters, dict) else None
    return ToolDescription(name, description or "", schema)


def responses_tools(tools: Any, builtins: Iterable[str] = ()) -> tuple[list[ToolDescription], set[str]]:
    """Responses `tools` -> (function descriptions, enabled built-ins used: "python"/"browser").

    `namespace` groups (Codex CLI) are expanded to their functions; built-in tool types map to
    the server's built-ins when it enables them and are ignored otherwise; other types are
    accepted and left out of the prompt."""
    if tools is None:
        return [], set()
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array", "tools", "invalid_type")
    functions: list[ToolDescription] = []
    used: set[str] = set()
    enabled = set(builtins)

    def add(tool: Any, param: str) -> None:
        if not isinstance(tool, dict):
            raise bad_request(f"'{param}' must be an object", param, "invalid_type")
        kind = tool.get("type")
        if kind == "function":
            functions.append(function_description(tool.get("name"), tool.get("description"),
                                                  tool.get("parameters"), param))
        elif kind == "namespace":
            for j, inner in enumerate(get(tool, "tools", "array", param, [])):
                add(inner, f"{param}.tools[{j}]")
        elif kind in BUILTIN_TOOL_TYPES:
            builtin = BUILTIN_TOOL_TYPES[kind]
            if builtin in enabled:
                used.add(builtin)
            else:
                log.warning("tool %s: type %r is not enabled on this server; ignored", param, kind)
        else:
            log.warning("tool %s: type %r is not served; left out of the prompt", param, kind)

    for i, tool in enumerate(tools):
        add(tool, f"tools[{i}]")
    _check_unique(functions)
    return functions, used


def chat_tools(tools: Any) -> list[ToolDescription]:
    """Chat Completions `tools` (`{type: function, function: {...}}`) -> descriptions."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array", "tools", "invalid_type")
    functions = []
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_request(f"'{param}' must be an object", param, "invalid_type")
        if tool.get("type", "function") != "function":
            log.warning("tool %s: type %r is not served; left out of the prompt", param, tool.get("type"))
            continue
        fn = get(tool, "function", "object", param, required=True)
        functions.append(function_description(fn.get("name"), fn.get("description"),
                                              fn.get("parameters"), f"{param}.function"))
    _check_unique(functions)
    return functions


def _check_unique(functions: list[ToolDescription]) -> None:
    seen = set()
    for tool in functions:
        if tool.name in seen:
            raise bad_request(f"two tools are named {tool.name!r}", "tools", "invalid_value")
        seen.add(tool.name)


def tool_choice_of(choice: Any, functions: list[ToolDescription], param: str = "tool_choice") -> Any:
    """The request's `tool_choice` in the constraint's terms: "auto", "none", "required" or
    `{"type": "function", "name": X}` (Chat's `{"function": {"name": X}}` included).

    `allowed_tools` (either API's shape) is checked here and enforced by the constraint;
    kinds the server does not serve are accepted and mean "auto"."""
    if choice is None or choice in ("auto", "none", "required"):
        choice = choice or "auto"
        if choice == "required" and not functions:
            raise bad_request("tool_choice 'required' needs at least one function tool", param)
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = function_named(choice)
        if name not in [t.name for t in functions]:
            raise bad_request(f"tool_choice names function {name!r}, which is not in 'tools'",
                              param, "invalid_value")
        return {"type": "function", "name": name}
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        try:
            allowed_tools_of(choice, [t.name for t in functions])
        except SchemaError as e:
            raise bad_request(str(e), param, "invalid_value") from None
        return choice
    if isinstance(choice, dict):
        log.warning("tool_choice of type %r is not enforced; using auto", choice.get("type"))
        return "auto"
    raise bad_request(f"'{param}' must be 'auto', 'none', 'required' or an object, got {choice!r}",
                      param, "invalid_value")


# --------------------------------------------------------------------------- messages


def assistant(text: str, channel: str) -> Message:
    return Message(Author(Role.ASSISTANT), [TextContent(text)], channel)


def function_call(name: str, arguments: str) -> Message:
    """A call in history, rendered as the oracle does (recipient before the channel)."""
    return Message(Author(Role.ASSISTANT), [TextContent(arguments)], "commentary",
                   f"{NAMESPACE}.{name}", JSON_CONTENT_TYPE)


def tool_result(name: str, output: str) -> Message:
    return Message(Author(Role.TOOL, f"{NAMESPACE}.{name}"), [TextContent(output)], "commentary",
                   "assistant")


def encode_reasoning(text: str) -> str:
    return REASONING_PREFIX + base64.b64encode(text.encode("utf-8")).decode("ascii")


def decode_reasoning(blob: Any) -> str | None:
    """The text from our `encrypted_content`, or None (another server's, or damaged)."""
    if not isinstance(blob, str) or not blob.startswith(REASONING_PREFIX):
        return None
    try:
        return base64.b64decode(blob[len(REASONING_PREFIX):], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def content_text(content: Any, param: str, kinds: tuple[str, ...]) -> list[str]:
    """The text parts of a string-or-parts content (images are dropped with a warning)."""
    if isinstance(content, str):
        return [content]
    if content is None:
        return []
    if not isinstance(content, list):
        raise bad_request(f"'{param}' must be a string or an array of content parts", param, "invalid_type")
    texts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise bad_request(f"'{where}' must be an object", where, "invalid_type")
        kind = part.get("type")
        if kind in kinds:
            texts.append(get(part, "text", "string", where, "")
                         if kind != "refusal" else get(part, "refusal", "string", where, ""))
        else:
            log.warning("content part %s of type %r is not supported; dropped", where, kind)
    return texts


class HistoryReader:
    """Builds the harmony history from input items (Responses) or messages (Chat), keeping the
    call id -> function name map that tool results need (they carry only the id)."""

    def __init__(self, call_names: dict[str, str] | None = None):
        self.history: list[Message] = []
        self.instructions: list[str] = []
        self.call_names: dict[str, str] = dict(call_names or {})

    def _instruction(self, texts: list[str]) -> None:
        """System/developer text: into the developer message while nothing else was said, as a
        developer message in place after that."""
        text = "\n".join(texts)
        if not self.history:
            self.instructions.append(text)
        else:
            self.history.append(Message(Author(Role.DEVELOPER), [TextContent(text)]))

    def _tool_output(self, call_id: Any, output: Any, param: str) -> None:
        name = self.call_names.get(call_id) if isinstance(call_id, str) else None
        if name is None:
            raise bad_request(f"'{param}.call_id' {call_id!r} matches no earlier function call",
                              f"{param}.call_id", "invalid_value")
        if isinstance(output, (dict, list)) and not _is_parts(output):
            output = json.dumps(output)
        texts = content_text(output, f"{param}.output", ("input_text", "output_text", "text"))
        self.history.append(tool_result(name, "".join(texts)))

    @staticmethod
    def _role_and_texts(message: dict, param: str) -> tuple[str, list[str]]:
        role = get(message, "role", "string", param, required=True)
        kinds = ("input_text", "output_text", "text", "refusal")
        return role, content_text(message.get("content"), f"{param}.content", kinds)

    def _plain(self, role: str, texts: list[str]) -> bool:
        """Add a system, developer or user message; False for other roles."""
        if role in ("system", "developer"):
            self._instruction(texts)
        elif role == "user":
            self.history.append(Message(Author(Role.USER), [TextContent(t) for t in texts]))
        else:
            return False
        return True

    # ------------------------------------------------------------- Responses input items

    def responses_input(self, value: Any) -> None:
        if isinstance(value, str):
            self.history.append(Message.from_role_and_content(Role.USER, value))
            return
        if not isinstance(value, list):
            raise bad_request("'input' must be a string or an array of items", "input", "invalid_type")
        for i, item in enumerate(value):
            self.responses_item(item, f"input[{i}]")

    def responses_item(self, item: Any, param: str) -> None:
        if not isinstance(item, dict):
            raise bad_request(f"'{param}' must be an object", param, "invalid_type")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role, texts = self._role_and_texts(item, param)
            if role == "assistant":
                channel = "commentary" if item.get("phase") == "commentary" else "final"
                self.history.append(assistant("".join(texts), channel))
            elif not self._plain(role, texts):
                raise bad_request(f"'{param}.role' must be user, assistant, system or developer, "
                                  f"got {role!r}", f"{param}.role", "invalid_value")
        elif kind == "reasoning":
            text = decode_reasoning(item.get("encrypted_content"))
            if text is None:
                parts = item.get("content") or item.get("summary") or []
                text = "".join(content_text(parts, f"{param}.content",
                                            ("reasoning_text", "summary_text", "text")))
            if text:
                self.history.append(assistant(text, "analysis"))
        elif kind == "function_call":
            name = get(item, "name", "string", param, required=True)
            call_id = get(item, "call_id", "string", param, required=True)
            arguments = get(item, "arguments", "string", param, "")
            self.call_names[call_id] = name
            self.history.append(function_call(name, arguments))
        elif kind in ("custom_tool_call", "local_shell_call"):
            call_id = get(item, "call_id", "string", param, required=True)
            name = item.get("name") if kind == "custom_tool_call" else "local_shell"
            name = name if isinstance(name, str) and FUNCTION_NAME.match(name) else "tool"
            payload = {"input": item.get("input")} if kind == "custom_tool_call" else item.get("action")
            self.call_names[call_id] = name
            self.history.append(function_call(name, json.dumps(payload)))
        elif kind in ("function_call_output", "custom_tool_call_output", "local_shell_call_output"):
            self._tool_output(item.get("call_id"), item.get("output"), param)
        elif kind == "code_interpreter_call" and isinstance(item.get("code"), str):
            self.history.append(python_call(item["code"]))
            logs = [o.get("logs", "") for o in item.get("outputs") or [] if isinstance(o, dict)]
            self.history.append(python_result("".join(logs)))
        else:  # web_search_call, code_interpreter_call, compaction, item_reference, ...
            log.warning("input item %s of type %r is not rendered", param, kind)

    # ------------------------------------------------------------- Chat Completions messages

    def chat_messages(self, messages: Any) -> None:
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' must be a non-empty array", "messages", "invalid_type")
        for i, message in enumerate(messages):
            self.chat_message(message, f"messages[{i}]")

    def chat_message(self, message: Any, param: str) -> None:
        if not isinstance(message, dict):
            raise bad_request(f"'{param}' must be an object", param, "invalid_type")
        role, texts = self._role_and_texts(message, param)
        if self._plain(role, texts):
            return
        if role == "assistant":
            reasoning = message.get("reasoning", message.get("reasoning_content"))
            if isinstance(reasoning, str) and reasoning:
                self.history.append(assistant(reasoning, "analysis"))
            calls = get(message, "tool_calls", "array", param, [])
            text = "".join(texts)
            if text:
                self.history.append(assistant(text, "commentary" if calls else "final"))
            for j, call in enumerate(calls):
                where = f"{param}.tool_calls[{j}]"
                if not isinstance(call, dict):
                    raise bad_request(f"'{where}' must be an object", where, "invalid_type")
                fn = get(call, "function", "object", where, required=True)
                name = get(fn, "name", "string", f"{where}.function", required=True)
                call_id = get(call, "id", "string", where, required=True)
                self.call_names[call_id] = name
                self.history.append(function_call(name, get(fn, "arguments", "string",
                                                            f"{where}.function", "")))
        elif role in ("tool", "function"):
            call_id = message.get("tool_call_id")
            if role == "function":  # the legacy shape names the function itself
                call_id = self.call_names_by_name(message.get("name"))
            self._tool_output(call_id, "".join(texts), param)
        else:
            raise bad_request(f"'{param}.role' must be system, developer, user, assistant or "
                              f"tool, got {role!r}", f"{param}.role", "invalid_value")

    def call_names_by_name(self, name: Any) -> str | None:
        return next((cid for cid, n in self.call_names.items() if n == name), None)


def _is_parts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(p, dict) and "type" in p for p in value)


# --------------------------------------------------------------------------- model output


def item_kind(channel: str | None, recipient: str | None, builtins: Iterable[str] = ()) -> str:
    """What a harmony message from the model becomes: "reasoning", "message", "function_call",
    or "python_call" / "browser_call" (a built-in tool the server runs). A call counts on any
    channel (the model also calls from analysis); a call to a tool nobody declared is a
    function call, for the client to answer."""
    if recipient:
        namespace = recipient.split(".")[0]
        if namespace in BUILTIN_ITEMS and namespace in builtins:
            return f"{namespace}_call"
        return "function_call"
    return "reasoning" if channel == "analysis" else "message"


def python_call(code: str) -> Message:
    """A call to the built-in python tool, as the model writes it (analysis, content type code)."""
    return Message(Author(Role.ASSISTANT), [TextContent(code)], "analysis", "python", "code")


def python_result(output: str) -> Message:
    return Message(Author(Role.TOOL, "python"), [TextContent(output)], "analysis", "assistant")


def browser_action(recipient: str, arguments: str) -> dict[str, Any]:
    """A browser call as a `web_search_call` action: search, open_page or find_in_page."""
    try:
        args = json.loads(arguments)
    except ValueError:
        args = {}
    args = args if isinstance(args, dict) else {}
    name = recipient.split(".", 1)[-1]
    if name == "open":
        target = args.get("id")
        return {"type": "open_page", "url": target if isinstance(target, str) else None}
    if name == "find":
        return {"type": "find_in_page", "pattern": str(args.get("pattern", "")), "url": ""}
    return {"type": "search", "query": str(args.get("query", ""))}


def function_name(recipient: str) -> str:
    return recipient[len(NAMESPACE) + 1:] if recipient.startswith(NAMESPACE + ".") else recipient


def reasoning_token_count(tokenizer: HarmonyTokenizer, tokens: list[int]) -> int:
    """Generated text tokens of analysis messages (re-parsed: events carry no ids)."""
    parser = StreamParser(tokenizer, Role.ASSISTANT)
    count = 0
    for token in tokens:
        if parser.current_channel == "analysis" and parser.current_recipient is None \
                and parser.state.name == "CONTENT" and not tokenizer.is_special(token):
            count += 1
        parser.feed(token)
    return count
