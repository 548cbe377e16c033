"""Function tools: Python callables or OpenAI-style JSON definitions, and running their calls.

A callable's JSON Schema comes from its signature (type hints, defaults) and its docstring (the
first paragraph describes the function; `Args:` lines, Google style, or `:param x:` lines
describe parameters). A tool read from a JSON file has no implementation: the chat asks the user
for its result. Whatever goes wrong in a call (unknown function, arguments that are not a JSON
object, an exception) becomes a JSON error text the model reads, never an exception here.
"""
from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Union

from ..env import parse_json, read_json
from ..errors import GptOssError, ToolsFileError
from ..harmony import Message, ToolDescription, ToolNamespaceConfig
from .base import Tool

NAMESPACE = "functions"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}


@dataclass
class FunctionTool:
    name: str
    description: str
    parameters: dict | None = None
    function: Callable[..., Any] | None = None

    def description_for_harmony(self) -> ToolDescription:
        return ToolDescription(self.name, self.description, self.parameters)

    def run(self, arguments: str) -> str:
        """Call the function with the model's JSON arguments; errors become the result."""
        if self.function is None:
            return _error(f"function {self.name} has no implementation")
        try:
            kwargs = parse_json(arguments, "arguments") if arguments.strip() else {}
        except GptOssError as e:  # also hostile nesting, which json.loads would crash on
            return _error(f"{e}; send a JSON object")
        if not isinstance(kwargs, dict):
            return _error("arguments must be a JSON object")
        try:
            result = self.function(**kwargs)
        except TypeError as e:
            return _error(f"bad arguments for {self.name}: {e}")
        except Exception as e:  # the model reads it and may retry
            return _error(f"{type(e).__name__}: {e}")
        return result if isinstance(result, str) else json.dumps(result, default=str)


def _error(message: str) -> str:
    return json.dumps({"error": message})


# --------------------------------------------------------------------------- schemas from hints


def _schema(hint: Any) -> dict:
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _schema(options[0])
        return {"anyOf": [_schema(a) for a in options]}
    if origin is Literal:
        return {"type": _SCALARS.get(type(args[0]), "string"), "enum": list(args)}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [m.value for m in hint]
        return {"type": _SCALARS.get(type(values[0]), "string"), "enum": values}
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set):
        item = args[0] if args else inspect.Parameter.empty
        return {"type": "array", "items": _schema(item)} if args else {"type": "array"}
    if origin is dict or hint is dict:
        return {"type": "object"}
    raise GptOssError(f"no JSON Schema for type hint {hint!r}")


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a Google-style or Sphinx-style docstring."""
    lines = inspect.cleandoc(doc).splitlines() if doc else []
    summary: list[str] = []
    params: dict[str, str] = {}
    in_args = False
    current = None
    for line in lines:
        stripped = line.strip()
        sphinx = re.match(r":param\s+(?:\w+\s+)?(\w+):\s*(.*)", stripped)
        if sphinx:
            current = sphinx.group(1)
            params[current] = sphinx.group(2)
            continue
        if stripped.lower() in ("args:", "arguments:", "parameters:"):
            in_args, current = True, None
            continue
        if in_args:
            google = re.match(r"(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", stripped)
            if line[:1].isspace() or not stripped:
                if google and (current is None or len(line) - len(line.lstrip()) <= 4):
                    current = google.group(1)
                    params[current] = google.group(2)
                elif current and stripped:
                    params[current] += " " + stripped
                continue
            in_args = False
        if stripped.startswith(":") or re.match(r"(returns?|raises?|yields?):", stripped.lower()):
            current = None
            continue
        if not params:
            summary.append(line)
    return "\n".join(summary).strip(), params


def function_tool(function: Callable[..., Any], name: str | None = None) -> FunctionTool:
    """A `FunctionTool` for a Python callable, its schema derived from hints and docstring."""
    name = name or function.__name__
    description, param_docs = _docstring_parts(inspect.getdoc(function) or "")
    try:
        hints = typing.get_type_hints(function)
    except Exception as e:
        raise GptOssError(f"function {name}: cannot read its type hints ({e})") from None
    properties: dict[str, dict] = {}
    required: list[str] = []
    for param in inspect.signature(function).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        try:
            schema = _schema(hints.get(param.name, inspect.Parameter.empty))
        except GptOssError as e:
            raise GptOssError(f"function {name}, parameter {param.name}: {e}") from None
        if param.name in param_docs:
            schema = {**schema, "description": param_docs[param.name]}
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
        elif param.default is not None:
            default = _json_value(param.default)
            if default is not _NO_JSON:
                schema["default"] = default
        properties[param.name] = schema
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return FunctionTool(name, description, parameters, function)


_NO_JSON = object()


def _json_value(value: Any) -> Any:
    """`value` as plain JSON (a tuple becomes a list), or `_NO_JSON` when it has none."""
    try:
        return json.loads(json.dumps(value, default=_enum_value, allow_nan=False))
    except (TypeError, ValueError):  # ValueError: NaN, infinity or a circular structure
        return _NO_JSON


def _enum_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"not JSON: {type(value).__name__}")


# --------------------------------------------------------------------------- tools files


def load_tools_file(path: str | Path) -> list[FunctionTool]:
    """Read a JSON list of OpenAI-style function tools (`{"type": "function", "function":
    {...}}` or the bare `{"name", "description", "parameters"}`)."""
    path = Path(path)
    data = read_json(path, "tools file", expect=(list, dict), error=ToolsFileError)
    if isinstance(data, dict) and isinstance(data.get("tools"), list):
        data = data["tools"]
    if not isinstance(data, list):
        raise ToolsFileError(f"tools file {path}: expected a JSON list of function tools")
    tools = [_tool_from_json(item, f"tools file {path}, tool {i}") for i, item in enumerate(data)]
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        if tool.name in seen:  # a registry keeps one per name: the later would silently win
            raise ToolsFileError(f"tools file {path}: tools {seen[tool.name]} and {i} are both "
                                 f"named {tool.name!r}")
        seen[tool.name] = i
    return tools


def _tool_from_json(item: Any, where: str) -> FunctionTool:
    if isinstance(item, dict) and item.get("type", "function") != "function":
        raise ToolsFileError(f"{where}: only function tools are supported, got type {item['type']!r}")
    spec = item.get("function", item) if isinstance(item, dict) else None
    if not isinstance(spec, dict):
        raise ToolsFileError(f"{where}: expected an object with a 'name'")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ToolsFileError(f"{where}: invalid function name {name!r}")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise ToolsFileError(f"{where} ({name}): 'description' must be a string")
    parameters = spec.get("parameters")
    if parameters is not None and (not isinstance(parameters, dict)
                                   or parameters.get("type", "object") != "object"):
        raise ToolsFileError(f"{where} ({name}): 'parameters' must be a JSON Schema object")
    return FunctionTool(name, description, parameters)


# --------------------------------------------------------------------------- the registry


class ToolRegistry:
    """The function tools of one chat, by name."""

    def __init__(self, tools: Iterable[FunctionTool | Callable[..., Any]] = ()):
        self.tools: dict[str, FunctionTool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: FunctionTool | Callable[..., Any]) -> FunctionTool:
        if not isinstance(tool, FunctionTool):
            tool = function_tool(tool)
        if not _NAME.match(tool.name):
            raise GptOssError(f"invalid function tool name {tool.name!r}")
        self.tools[tool.name] = tool
        return tool

    def __bool__(self) -> bool:
        return bool(self.tools)

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def descriptions(self) -> list[ToolDescription]:
        return [t.description_for_harmony() for t in self.tools.values()]

    @staticmethod
    def function_name(recipient: str | None) -> str | None:
        """`functions.get_weather` -> `get_weather`; None for other recipients."""
        if recipient and recipient.startswith(NAMESPACE + "."):
            return recipient[len(NAMESPACE) + 1:]
        return None

    def run(self, name: str, arguments: str) -> str:
        tool = self.tools.get(name)
        if tool is None:
            return _error(f"unknown function {name!r}; available: {', '.join(self.tools) or 'none'}")
        return tool.run(arguments)


class FunctionsTool(Tool):
    """The `functions` namespace behind the `ToolRouter`: runs a registered callable; a
    function without one (from a tools file) goes to `on_call(call) -> str` when given, else
    `process` returns [] and the caller answers it."""

    name = NAMESPACE
    placement = "developer"

    def __init__(self, tools: Iterable[FunctionTool | Callable[..., Any]] | ToolRegistry = (),
                 on_call: Callable[[Message], str] | None = None):
        self.registry = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)
        self.on_call = on_call

    def namespace_config(self) -> ToolNamespaceConfig:
        return ToolNamespaceConfig(NAMESPACE, self.registry.descriptions(), None)

    def handles(self, recipient: str) -> bool:
        # Any functions.* recipient: an invented name gets an error reply, not "no tool".
        return recipient.startswith(NAMESPACE + ".") or recipient in self.registry

    def process(self, message: Message) -> list[Message]:
        recipient = message.recipient or ""
        name = ToolRegistry.function_name(recipient) or recipient
        tool = self.registry.tools.get(name)
        if tool is not None and tool.function is None:
            if self.on_call is None:
                return []
            return [self.reply(message, self.on_call(message))]
        return [self.reply(message, self.registry.run(name, message.text()))]
