"""The Tool interface and ToolRouter: routing by recipient, errors for unknown recipients,
user-registered tools, and the system message the tools contribute (token-exact with
openai-harmony where the text is the trained one)."""
from __future__ import annotations

import json

import openai_harmony as oh
import pytest

from mlx_gptoss.harmony import (
    Author, Conversation, DeveloperContent, Message, Role, SystemContent, TextContent,
    ToolNamespaceConfig, render_conversation_for_completion,
)
from mlx_gptoss.tools import BrowserTool, FunctionsTool, Tool, ToolError, ToolRouter
from mlx_gptoss.tools.functions import FunctionTool
from mlx_gptoss.tools.python import trained_namespace


class Echo(Tool):
    """A user-defined built-in-style tool."""

    name = "echo"

    def __init__(self):
        self.closed = 0

    def namespace_config(self) -> ToolNamespaceConfig:
        return ToolNamespaceConfig("echo", [], "Repeats what it is sent.")

    def process(self, message: Message) -> list[Message]:
        return [self.reply(message, message.text().upper())]

    def close(self) -> None:
        self.closed += 1


def call(recipient: str, text: str = "{}", channel: str = "commentary") -> Message:
    return Message(Author(Role.ASSISTANT), [TextContent(text)], channel, recipient)


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def test_router_routes_by_recipient_and_answers_strangers_with_an_error():
    echo = Echo()
    router = ToolRouter([echo, BrowserTool(), FunctionsTool([add, FunctionTool("ask", "Ask the user.")])])
    assert router.route("echo") is echo and router.route("echo.loud") is echo
    assert router.route("browser.search") is router["browser"]
    assert router.route("functions.add") is router["functions"]
    assert router.route("add") is router["functions"]  # models sometimes drop `functions.`
    assert router.route("echoes") is None and router.route(None) is None
    [reply] = router.process(call("echo", "hi"))
    assert (reply.author.name, reply.text(), reply.recipient, reply.channel) == ("echo", "HI", "assistant", "commentary")
    [reply] = router.process(call("functions.add", '{"a": 2, "b": 3}'))
    assert (reply.author.name, reply.text()) == ("functions.add", "5")
    [reply] = router.process(call("functions.nope"))
    assert json.loads(reply.text()) == {"error": "unknown function 'nope'; available: add, ask"}
    assert router.process(call("functions.ask")) == []  # no implementation: the caller answers
    [reply] = router.process(call("container.exec", "{}", "analysis"))
    assert (reply.author.name, reply.channel) == ("container.exec", "analysis")
    assert json.loads(reply.text()) == {
        "error": "no tool named container.exec is available; available: echo, browser, functions"}
    with router:
        pass
    assert echo.closed == 1


def test_functions_tool_can_ask_a_handler():
    tool = FunctionsTool([FunctionTool("ask", "Ask the user.")], on_call=lambda m: f"answer to {m.recipient}")
    assert tool.process(call("functions.ask"))[0].text() == "answer to functions.ask"


@pytest.mark.parametrize("tool, message", [
    (Echo(), "already registered"), (object(), "not a Tool")])
def test_bad_registrations_are_refused(tool, message):
    router = ToolRouter([Echo()])
    with pytest.raises(ToolError, match=message):
        router.register(tool)


def test_tools_render_in_the_right_message_token_exact_with_the_oracle(tok, oracle):
    router = ToolRouter([BrowserTool(), FunctionsTool([add])])
    system, developer = SystemContent(), DeveloperContent()
    router.apply(system, developer)
    system.with_tools(trained_namespace())
    conversation = Conversation([Message.from_role_and_content(Role.SYSTEM, system),
                                 Message.from_role_and_content(Role.DEVELOPER, developer),
                                 Message.from_role_and_content(Role.USER, "hi")])
    ours = render_conversation_for_completion(conversation, Role.ASSISTANT, tokenizer=tok)
    oh_system = (oh.SystemContent.new().with_browser_tool().with_python_tool())
    oh_developer = oh.DeveloperContent.new().with_function_tools([oh.ToolDescription.new(
        "add", "Add two numbers.", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                    "required": ["a", "b"]})])
    theirs = oracle.render_conversation_for_completion(oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, oh_system),
        oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh_developer),
        oh.Message.from_role_and_content(oh.Role.USER, "hi")]), oh.Role.ASSISTANT)
    assert ours == theirs
