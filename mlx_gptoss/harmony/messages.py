"""Harmony conversations as plain dataclasses, in openai-harmony's JSON.

The JSON is what `openai_harmony.Conversation.to_json()` writes and `from_json()` reads, so a
conversation moves between the two libraries unchanged. `from_dict` validates as it reads and
names the message at fault; `validate` checks what rendering needs (roles vs. content kinds,
tool names). Our one extension is `DeveloperContent.response_formats` (structured output),
which openai-harmony ignores.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

from ..env import parse_json
from ..errors import HarmonyError
from .constants import CHANNELS


class Role(str, Enum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    DEVELOPER = "developer"
    TOOL = "tool"


class ReasoningEffort(str, Enum):
    LOW = "Low"
    MEDIUM = "Medium"
    HIGH = "High"


DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
DEFAULT_CHANNELS = CHANNELS


@dataclass
class Author:
    role: Role
    name: str | None = None

    @classmethod
    def new(cls, role: Role, name: str) -> "Author":
        return cls(role, name)


@dataclass
class TextContent:
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"type": "text", "text": self.text}


@dataclass
class ToolDescription:
    name: str
    description: str
    parameters: dict | None = None

    @classmethod
    def new(cls, name: str, description: str, parameters: dict | None = None) -> "ToolDescription":
        return cls(name, description, parameters)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.parameters is not None:
            out["parameters"] = self.parameters
        return out


@dataclass
class ToolNamespaceConfig:
    name: str
    tools: list[ToolDescription] = field(default_factory=list)
    description: str | None = None

    # openai-harmony's constructors for the trained built-in namespaces. The text belongs to
    # the tools (mlx_gptoss.tools), which render what they really do; these return the
    # trained defaults, as the oracle does.
    @staticmethod
    def browser() -> "ToolNamespaceConfig":
        from ..tools.browser import browser_namespace

        return browser_namespace()

    @staticmethod
    def python() -> "ToolNamespaceConfig":
        from ..tools.python import trained_namespace

        return trained_namespace()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            out["description"] = self.description
        out["tools"] = [t.to_dict() for t in self.tools]
        return out


@dataclass
class ChannelConfig:
    valid_channels: list[str]
    channel_required: bool

    @classmethod
    def require_channels(cls, channels: list[str]) -> "ChannelConfig":
        return cls(list(channels), True)

    def to_dict(self) -> dict[str, Any]:
        return {"valid_channels": list(self.valid_channels), "channel_required": self.channel_required}


@dataclass
class ResponseFormat:
    """A JSON output the developer requires (structured output); rendered in the developer message."""

    name: str
    schema: dict
    description: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            out["description"] = self.description
        out["schema"] = self.schema
        return out


def _default_channels() -> ChannelConfig:
    return ChannelConfig.require_channels(list(DEFAULT_CHANNELS))


def _with_tools(tools: dict[str, ToolNamespaceConfig] | None, ns: ToolNamespaceConfig) -> dict:
    tools = dict(tools or {})
    tools[ns.name] = ns
    return tools


def _tools_to_dict(tools: dict[str, ToolNamespaceConfig]) -> dict[str, Any]:
    return {key: ns.to_dict() for key, ns in tools.items()}


@dataclass
class SystemContent:
    model_identity: str | None = DEFAULT_IDENTITY
    reasoning_effort: ReasoningEffort | None = ReasoningEffort.MEDIUM
    conversation_start_date: str | None = None
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF
    channel_config: ChannelConfig | None = field(default_factory=_default_channels)
    tools: dict[str, ToolNamespaceConfig] | None = None

    @classmethod
    def new(cls) -> "SystemContent":
        return cls()

    def with_model_identity(self, model_identity: str) -> "SystemContent":
        self.model_identity = model_identity
        return self

    def with_reasoning_effort(self, reasoning_effort: ReasoningEffort) -> "SystemContent":
        self.reasoning_effort = reasoning_effort
        return self

    def with_conversation_start_date(self, date: str) -> "SystemContent":
        self.conversation_start_date = date
        return self

    def with_knowledge_cutoff(self, knowledge_cutoff: str) -> "SystemContent":
        self.knowledge_cutoff = knowledge_cutoff
        return self

    def with_channel_config(self, channel_config: ChannelConfig) -> "SystemContent":
        self.channel_config = channel_config
        return self

    def with_required_channels(self, channels: list[str]) -> "SystemContent":
        self.channel_config = ChannelConfig.require_channels(channels)
        return self

    def with_tools(self, ns: ToolNamespaceConfig) -> "SystemContent":
        self.tools = _with_tools(self.tools, ns)
        return self

    def with_browser_tool(self) -> "SystemContent":
        return self.with_tools(ToolNamespaceConfig.browser())

    def with_python_tool(self) -> "SystemContent":
        return self.with_tools(ToolNamespaceConfig.python())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.model_identity is not None:
            out["model_identity"] = self.model_identity
        if self.reasoning_effort is not None:
            out["reasoning_effort"] = ReasoningEffort(self.reasoning_effort).value
        if self.conversation_start_date is not None:
            out["conversation_start_date"] = self.conversation_start_date
        if self.knowledge_cutoff is not None:
            out["knowledge_cutoff"] = self.knowledge_cutoff
        if self.channel_config is not None:
            out["channel_config"] = self.channel_config.to_dict()
        if self.tools is not None:
            out["tools"] = _tools_to_dict(self.tools)
        out["type"] = "system_content"
        return out


@dataclass
class DeveloperContent:
    instructions: str | None = None
    tools: dict[str, ToolNamespaceConfig] | None = None
    response_formats: list[ResponseFormat] | None = None

    @classmethod
    def new(cls) -> "DeveloperContent":
        return cls()

    def with_instructions(self, instructions: str) -> "DeveloperContent":
        self.instructions = instructions
        return self

    def with_tools(self, ns: ToolNamespaceConfig) -> "DeveloperContent":
        self.tools = _with_tools(self.tools, ns)
        return self

    def with_function_tools(self, tools: list[ToolDescription]) -> "DeveloperContent":
        return self.with_tools(ToolNamespaceConfig("functions", list(tools), None))

    def with_response_format(self, fmt: ResponseFormat) -> "DeveloperContent":
        self.response_formats = [*(self.response_formats or []), fmt]
        return self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.instructions is not None:
            out["instructions"] = self.instructions
        if self.tools is not None:
            out["tools"] = _tools_to_dict(self.tools)
        if self.response_formats is not None:
            out["response_formats"] = [f.to_dict() for f in self.response_formats]
        out["type"] = "developer_content"
        return out


Content = Union[TextContent, SystemContent, DeveloperContent]


@dataclass
class Message:
    author: Author
    content: list[Content] = field(default_factory=list)
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None

    @classmethod
    def from_author_and_content(cls, author: Author, content: str | Content) -> "Message":
        return cls(author, [TextContent(content) if isinstance(content, str) else content])

    @classmethod
    def from_role_and_content(cls, role: Role, content: str | Content) -> "Message":
        return cls.from_author_and_content(Author(role), content)

    @classmethod
    def from_role_and_contents(cls, role: Role, contents: list[Content]) -> "Message":
        return cls(Author(role), list(contents))

    def adding_content(self, content: str | Content) -> "Message":
        self.content.append(TextContent(content) if isinstance(content, str) else content)
        return self

    def with_channel(self, channel: str) -> "Message":
        self.channel = channel
        return self

    def with_recipient(self, recipient: str) -> "Message":
        self.recipient = recipient
        return self

    def with_content_type(self, content_type: str) -> "Message":
        self.content_type = content_type
        return self

    def text(self) -> str:
        """The concatenated text parts (what a tool call's arguments or an answer is)."""
        return "".join(c.text for c in self.content if isinstance(c, TextContent))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "role": Role(self.author.role).value,
            "name": self.author.name,
            "content": [c.to_dict() for c in self.content],
        }
        for key in ("channel", "recipient", "content_type"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, index: int | None = None) -> "Message":
        return _MessageReader(index).message(data)


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)

    @classmethod
    def from_messages(cls, messages: list[Message]) -> "Conversation":
        return cls(list(messages))

    def __iter__(self):
        return iter(self.messages)

    def __len__(self) -> int:
        return len(self.messages)

    def to_dict(self) -> dict[str, Any]:
        return {"messages": [m.to_dict() for m in self.messages]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> "Conversation":
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise HarmonyError('a conversation must be a JSON object with a "messages" list')
        conversation = cls([Message.from_dict(m, i) for i, m in enumerate(data["messages"])])
        validate_conversation(conversation)
        return conversation

    @classmethod
    def from_json(cls, payload: str | bytes, what: str | None = None) -> "Conversation":
        """Parse openai-harmony's JSON; errors start with `what` (the file's name, say)."""
        data = parse_json(payload, what or "conversation", error=HarmonyError)
        try:
            return cls.from_dict(data)
        except HarmonyError as e:
            if what is None:
                raise
            raise HarmonyError(f"{what}: {e}") from None


# --------------------------------------------------------------------------- reading JSON


class _MessageReader:
    """Reads one message's JSON, raising HarmonyError that names the message and the field."""

    def __init__(self, index: int | None):
        self.where = "message" if index is None else f"message {index}"

    def fail(self, what: str) -> HarmonyError:
        return HarmonyError(f"{self.where}: {what}")

    def string(self, obj: dict, key: str, required: bool = False, ctx: str = "") -> str | None:
        value = obj.get(key)
        if value is None:
            if required:
                raise self.fail(f"{ctx}missing {key!r}")
            return None
        if not isinstance(value, str):
            raise self.fail(f"{ctx}{key!r} must be a string, got {type(value).__name__}")
        return value

    def message(self, data: Any) -> Message:
        if not isinstance(data, dict):
            raise self.fail("must be a JSON object")
        role_name = data.get("role")
        try:
            role = Role(role_name)
        except ValueError:
            raise self.fail(f"unknown role {role_name!r} (expected one of "
                            f"{', '.join(r.value for r in Role)})") from None
        author = Author(role, self.string(data, "name"))
        raw = data.get("content")
        if isinstance(raw, str):
            raw = [{"type": "text", "text": raw}]
        if not isinstance(raw, list):
            raise self.fail('"content" must be a string or a list of content parts')
        message = Message(author, [self.content(part, i) for i, part in enumerate(raw)])
        message.channel = self.string(data, "channel")
        message.recipient = self.string(data, "recipient")
        message.content_type = self.string(data, "content_type")
        return message

    def content(self, part: Any, i: int) -> Content:
        ctx = f"content {i}: "
        if not isinstance(part, dict):
            raise self.fail(f"{ctx}must be a JSON object")
        kind = part.get("type")
        if kind == "text":
            return TextContent(self.string(part, "text", True, ctx))
        if kind == "system_content":
            return self.system(part, ctx)
        if kind == "developer_content":
            return self.developer(part, ctx)
        raise self.fail(f"{ctx}unknown content type {kind!r} "
                        "(expected text, system_content or developer_content)")

    def system(self, part: dict, ctx: str) -> SystemContent:
        content = SystemContent()
        for key in ("model_identity", "conversation_start_date", "knowledge_cutoff"):
            if key in part:
                setattr(content, key, self.string(part, key, ctx=ctx))
        if "reasoning_effort" in part:
            content.reasoning_effort = self.effort(part["reasoning_effort"], ctx)
        if "channel_config" in part:
            content.channel_config = self.channels(part["channel_config"], ctx)
        if "tools" in part:
            content.tools = self.namespaces(part["tools"], ctx)
        return content

    def developer(self, part: dict, ctx: str) -> DeveloperContent:
        content = DeveloperContent(instructions=self.string(part, "instructions", ctx=ctx))
        if part.get("tools") is not None:
            content.tools = self.namespaces(part["tools"], ctx)
        formats = part.get("response_formats")
        if formats is not None:
            if not isinstance(formats, list):
                raise self.fail(f"{ctx}'response_formats' must be a list")
            content.response_formats = [self.response_format(f, ctx) for f in formats]
        return content

    def effort(self, value: Any, ctx: str) -> ReasoningEffort | None:
        if value is None:
            return None
        for effort in ReasoningEffort:
            if isinstance(value, str) and value.lower() == effort.value.lower():
                return effort
        raise self.fail(f"{ctx}unknown reasoning_effort {value!r} (expected Low, Medium or High)")

    def channels(self, value: Any, ctx: str) -> ChannelConfig | None:
        if value is None:
            return None
        channels = value.get("valid_channels") if isinstance(value, dict) else None
        required = value.get("channel_required") if isinstance(value, dict) else None
        if not (isinstance(channels, list) and all(isinstance(c, str) for c in channels)
                and isinstance(required, bool)):
            raise self.fail(f"{ctx}channel_config needs 'valid_channels' (strings) and "
                            "'channel_required' (boolean)")
        return ChannelConfig(list(channels), required)

    def namespaces(self, value: Any, ctx: str) -> dict[str, ToolNamespaceConfig] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(f"{ctx}'tools' must be an object mapping namespace names to namespaces")
        return {key: self.namespace(ns, f"{ctx}namespace {key!r}: ") for key, ns in value.items()}

    def namespace(self, ns: Any, ctx: str) -> ToolNamespaceConfig:
        if not isinstance(ns, dict):
            raise self.fail(f"{ctx}must be a JSON object")
        tools = ns.get("tools")
        if not isinstance(tools, list):
            raise self.fail(f"{ctx}'tools' must be a list")
        return ToolNamespaceConfig(
            name=self.string(ns, "name", True, ctx),
            tools=[self.tool(t, f"{ctx}tool {j}: ") for j, t in enumerate(tools)],
            description=self.string(ns, "description", ctx=ctx),
        )

    def tool(self, tool: Any, ctx: str) -> ToolDescription:
        if not isinstance(tool, dict):
            raise self.fail(f"{ctx}must be a JSON object")
        name = self.string(tool, "name", ctx=ctx)
        if not name:
            raise self.fail(f"{ctx}missing tool name")
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise self.fail(f"{ctx}'parameters' must be a JSON Schema object")
        return ToolDescription(name, self.string(tool, "description", ctx=ctx) or "", parameters)

    def response_format(self, fmt: Any, ctx: str) -> ResponseFormat:
        if not isinstance(fmt, dict) or not isinstance(fmt.get("schema"), dict):
            raise self.fail(f"{ctx}a response format needs a 'name' and a 'schema' object")
        return ResponseFormat(self.string(fmt, "name", True, ctx), fmt["schema"],
                              self.string(fmt, "description", ctx=ctx))


# --------------------------------------------------------------------------- validation


def validate_message(message: Message, index: int | None = None) -> None:
    """Refuse what harmony cannot express: misplaced system/developer content, nameless tools."""
    where = "message" if index is None else f"message {index}"
    if not isinstance(message, Message):
        raise HarmonyError(f"{where}: expected a Message, got {type(message).__name__}")
    try:
        role = Role(message.author.role)
    except ValueError:
        raise HarmonyError(f"{where}: unknown role {message.author.role!r}") from None
    if role is Role.TOOL and not message.author.name:
        raise HarmonyError(f"{where}: a tool message needs the tool's name as author name "
                           "(e.g. functions.get_weather)")
    for i, part in enumerate(message.content):
        if isinstance(part, SystemContent) and role is not Role.SYSTEM:
            raise HarmonyError(f"{where}: system content in a {role.value} message")
        if isinstance(part, DeveloperContent) and role is not Role.DEVELOPER:
            raise HarmonyError(f"{where}: developer content in a {role.value} message")
        if not isinstance(part, (TextContent, SystemContent, DeveloperContent)):
            raise HarmonyError(f"{where}: content {i} has unknown type {type(part).__name__}")
        tools = getattr(part, "tools", None) or {}
        for key, ns in tools.items():
            for j, tool in enumerate(ns.tools):
                if not tool.name:
                    raise HarmonyError(f"{where}: tool {j} in namespace {key!r} has no name")


def validate_conversation(conversation: Conversation | list[Message]) -> None:
    for i, message in enumerate(conversation):
        validate_message(message, i)
