"""One interface for every tool the model can call, and the router that dispatches calls.

A `Tool` owns everything about itself: its harmony namespace (the name the model addresses,
`python`, `browser`, `functions`), the instructions it contributes to the system or developer
message (so they can state what the tool really does: its real timeout, its real directory),
and `process(call) -> [reply messages]`. The agent loop, `Chat`, the CLI and the server hold
one `ToolRouter` and never special-case a tool: adding a tool is registering it.

Built-in tools (browser, python) are rendered in the system message, as the model was trained;
function tools in the developer message (`Tool.placement`).
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Iterable, Iterator, Literal

from ..errors import GptOssError
from ..harmony import (
    Author,
    DeveloperContent,
    Message,
    Role,
    SystemContent,
    TextContent,
    ToolNamespaceConfig,
)

Placement = Literal["system", "developer"]


class ToolError(GptOssError):
    """A tool was misconfigured (bad option, no sandbox available, duplicate name)."""


class Tool(ABC):
    """A tool the model calls by recipient (`name` or `name.function`).

    Subclasses set `name` and implement `namespace_config()` and `process()`. A tool may hold
    resources (a process, an HTTP session): use it as a context manager or call `close()`.
    """

    name: str = ""
    placement: Placement = "system"

    @abstractmethod
    def namespace_config(self) -> ToolNamespaceConfig:
        """The harmony namespace (functions and instructions) this tool shows the model."""

    @abstractmethod
    def process(self, message: Message) -> list[Message]:
        """The tool's reply messages to the assistant's `message` addressed to it. An empty
        list means the tool cannot answer this call itself and leaves it to the caller (a
        function tool with no implementation)."""

    @property
    def instructions(self) -> str | None:
        """The text this tool adds to the prompt (its namespace description)."""
        return self.namespace_config().description

    def handles(self, recipient: str) -> bool:
        return recipient == self.name or recipient.startswith(self.name + ".")

    def reply(self, call: Message, text: str) -> Message:
        """A reply to `call`: authored by the recipient the model used, on the call's channel,
        addressed back to the assistant (harmony's tool-result shape)."""
        return Message(Author(Role.TOOL, call.recipient or self.name), [TextContent(text)],
                       call.channel or "commentary", "assistant")

    def error(self, call: Message, text: str) -> Message:
        """An error reply the model reads (and may recover from), never an exception."""
        return self.reply(call, json.dumps({"error": text}))

    def close(self) -> None:
        """Release what the tool holds; it may be used again afterwards (it restarts)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ToolRouter:
    """The tools of one conversation, routed by recipient.

    `process(call)` answers any call: a registered tool's replies, or an error reply for a
    recipient nobody handles. `apply(system, developer)` adds every tool's namespace to the
    message where it belongs.
    """

    def __init__(self, tools: Iterable[Tool] = ()):
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> Tool:
        if not isinstance(tool, Tool):
            raise ToolError(f"not a Tool: {type(tool).__name__} (subclass mlx_gptoss.tools.Tool)")
        if not tool.name or "." in tool.name or " " in tool.name:
            raise ToolError(f"invalid tool name {tool.name!r} (one word, no dots)")
        if tool.name in self.tools:
            raise ToolError(f"a tool named {tool.name!r} is already registered")
        self.tools[tool.name] = tool
        return tool

    def __iter__(self) -> Iterator[Tool]:
        return iter(self.tools.values())

    def __len__(self) -> int:
        return len(self.tools)

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __getitem__(self, name: str) -> Tool:
        return self.tools[name]

    def route(self, recipient: str | None) -> Tool | None:
        """The tool for `recipient`; a bare function name (`get_weather`, which models
        sometimes write without `functions.`) goes to the tool that handles
        `functions.get_weather`."""
        if not recipient:
            return None
        recipient = recipient.strip()
        namespace = recipient.split(".", 1)[0]
        tool = self.tools.get(namespace)
        if tool is not None and tool.handles(recipient):
            return tool
        functions = self.tools.get("functions")
        if functions is not None and "." not in recipient and functions.handles(recipient):
            return functions
        return None

    def process(self, message: Message) -> list[Message]:
        """The replies to an assistant message addressed to a tool (see `Tool.process`)."""
        tool = self.route(message.recipient)
        if tool is None:
            available = ", ".join(self.tools) or "none"
            name = message.recipient or "(no recipient)"
            return [Message(Author(Role.TOOL, message.recipient or "tool"),
                            [TextContent(json.dumps({"error": f"no tool named {name} is available; "
                                                     f"available: {available}"}))],
                            message.channel or "commentary", "assistant")]
        return tool.process(message)

    def namespaces(self, placement: Placement) -> list[ToolNamespaceConfig]:
        return [t.namespace_config() for t in self.tools.values() if t.placement == placement]

    def apply(self, system: SystemContent, developer: DeveloperContent | None = None) -> None:
        """Add the tools' namespaces: built-ins to `system`, function tools to `developer`."""
        for ns in self.namespaces("system"):
            system.with_tools(ns)
        if developer is not None:
            for ns in self.namespaces("developer"):
                if ns.tools:
                    developer.with_tools(ns)

    def close(self) -> None:
        errors = []
        for tool in self.tools.values():
            try:
                tool.close()
            except Exception as e:  # close every tool even if one fails
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> "ToolRouter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
