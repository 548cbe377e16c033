"""Conversation → o200k_harmony token ids, token-exact with openai-harmony 0.0.8.

Each piece of text (role word, `:name`, ` to=recipient`, channel, content type, each content part)
is encoded on its own, as ordinary text, and control tokens are inserted as ids: so nothing a
user or tool writes can become a control token, and token boundaries match the oracle's.

Chain of thought. openai-harmony (`auto_drop_analysis=True`, its default) drops analysis
messages only when the last assistant message is on the `final` channel, and then only those
before the *first* final message of the whole conversation: in a three-turn chat only the first
turn's reasoning goes. The format's documented intent is different: drop the reasoning of every
finished turn (anything before the latest final answer) and keep it inside an ongoing
tool-calling turn. `RenderConversationConfig(drop_finished_turns=True)` selects that intent
(the chat's deliberate choice); the default reproduces the oracle bit for bit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

from ..env import check_depth
from ..errors import HarmonyError
from .constants import ANALYSIS, FINAL
from .messages import (
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    ResponseFormat,
    Role,
    SystemContent,
    TextContent,
    ToolNamespaceConfig,
    validate_message,
)
from .tokenizer import HarmonyTokenizer, load_tokenizer
from .typescript import schema_to_typescript

CONSTRAIN = "<|constrain|>"


@dataclass
class RenderConversationConfig:
    """auto_drop_analysis: drop earlier reasoning (oracle rule); drop_finished_turns: use the
    format's intent instead (drop the analysis of every turn that ended in a final answer)."""

    auto_drop_analysis: bool = True
    drop_finished_turns: bool = False


# --------------------------------------------------------------------------- text of sections


def rust_lines(text: str) -> list[str]:
    """Rust's `str::lines`: split on `\\n`, strip a `\\r` before it, no empty last line."""
    parts = text.split("\n")
    last = parts.pop()
    lines = [p[:-1] if p.endswith("\r") else p for p in parts]
    if last:
        lines.append(last)
    return lines


def tools_section(tools: dict[str, ToolNamespaceConfig]) -> str:
    """`# Tools` with one `## namespace` block per namespace, in key order."""
    sections = ["# Tools"]
    for key in sorted(tools):
        ns = tools[key]
        block = [f"## {ns.name}\n"]
        comment = "// " if ns.tools else ""
        block.extend(comment + line for line in rust_lines(ns.description or ""))
        if ns.tools:
            block.append(f"namespace {ns.name} {{\n")
            for tool in ns.tools:
                block.extend(f"// {line}" for line in rust_lines(tool.description))
                if tool.parameters is not None:
                    params = schema_to_typescript(tool.parameters, "")
                    block.append(f"type {tool.name} = (_: {params}) => any;\n")
                else:
                    block.append(f"type {tool.name} = () => any;\n")
            block.append(f"}} // namespace {ns.name}")
        sections.append("\n".join(block))
    return "\n\n".join(sections)


def response_formats_section(formats: list[ResponseFormat]) -> str:
    """`# Response Formats`: per format `## name`, `// description` lines, the schema as JSON.

    openai-harmony has no API for this; the layout follows its format documentation
    (structured output), with the schema as compact JSON.
    """
    blocks = ["# Response Formats"]
    for fmt in formats:
        check_depth(fmt.schema, f"response format {fmt.name}", HarmonyError)
        lines = [f"## {fmt.name}", ""]
        lines.extend(f"// {line}" for line in rust_lines(fmt.description or ""))
        lines.append(json.dumps(fmt.schema, ensure_ascii=False, separators=(",", ":")))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def system_text(content: SystemContent, has_function_tools: bool = False) -> str:
    """The text of a system message: identity/dates, reasoning, built-in tools, channels."""
    sections = []
    top = []
    if content.model_identity is not None:
        top.append(content.model_identity)
    if content.knowledge_cutoff is not None:
        top.append(f"Knowledge cutoff: {content.knowledge_cutoff}")
    if content.conversation_start_date is not None:
        top.append(f"Current date: {content.conversation_start_date}")
    if top:
        sections.append("\n".join(top))
    if content.reasoning_effort is not None:
        sections.append(f"Reasoning: {ReasoningEffort(content.reasoning_effort).value.lower()}")
    if content.tools:
        sections.append(tools_section(content.tools))
    channels = content.channel_config
    if channels is not None and channels.valid_channels:
        header = f"# Valid channels: {', '.join(channels.valid_channels)}."
        if channels.channel_required:
            header += " Channel must be included for every message."
        if has_function_tools:
            header += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(header)
    return "\n\n".join(sections)


def developer_text(content: DeveloperContent) -> str:
    """The text of a developer message: instructions, function tools, response formats."""
    sections = []
    if content.instructions is not None:
        sections += ["# Instructions", content.instructions]
    if content.tools:
        sections.append(tools_section(content.tools))
    if content.response_formats:
        sections.append(response_formats_section(content.response_formats))
    return "\n\n".join(sections)


# --------------------------------------------------------------------------- tokens


def has_function_tools(messages: Iterable[Message]) -> bool:
    """Whether a developer message defines at least one tool in the `functions` namespace."""
    for message in messages:
        for part in message.content:
            if isinstance(part, DeveloperContent) and part.tools:
                ns = part.tools.get("functions")
                if ns is not None and ns.tools:
                    return True
    return False


def render_message(message: Message, tokenizer: HarmonyTokenizer | None = None, *,
                   function_tools: bool = False, index: int | None = None) -> list[int]:
    """One message: `<|start|>header<|message|>content<|end|>` (or `<|call|>` for tool calls)."""
    validate_message(message, index)
    tok = tokenizer or load_tokenizer()
    out = [tok.start]
    role = Role(message.author.role)
    if role is Role.TOOL:
        out += tok.encode(message.author.name)
    else:
        out += tok.encode(role.value)
        if message.author.name is not None:
            out += tok.encode(f":{message.author.name}")
    if message.recipient is not None and message.recipient != "all":
        out += tok.encode(f" to={message.recipient}")
    if message.channel is not None:
        out.append(tok.channel)
        out += tok.encode(message.channel)
    if message.content_type is not None:
        if message.content_type.startswith(CONSTRAIN):
            out += tok.encode(" ")
            out.append(tok.constrain)
            out += tok.encode(message.content_type[len(CONSTRAIN):])
        else:
            out += tok.encode(f" {message.content_type}")
    out.append(tok.message)
    for part in message.content:
        if isinstance(part, TextContent):
            out += tok.encode(part.text)
        elif isinstance(part, SystemContent):
            out += tok.encode(system_text(part, function_tools))
        else:
            out += tok.encode(developer_text(part))
    out.append(tok.call if role is Role.ASSISTANT and message.recipient is not None else tok.end)
    return out


def dropped_analysis(messages: list[Message], config: RenderConversationConfig | None) -> set[int]:
    """Indices of the analysis messages that rendering leaves out (see the module docstring)."""
    config = config or RenderConversationConfig()
    if not config.auto_drop_analysis:
        return set()
    if config.drop_finished_turns:
        finals = [i for i, m in enumerate(messages)
                  if Role(m.author.role) is Role.ASSISTANT and m.channel == FINAL]
        last_final = finals[-1] if finals else 0
        return {i for i, m in enumerate(messages[:last_final]) if m.channel == ANALYSIS}
    last_assistant = next((m for m in reversed(messages) if Role(m.author.role) is Role.ASSISTANT), None)
    if last_assistant is None or last_assistant.channel != FINAL:
        return set()
    first_final = next(i for i, m in enumerate(messages) if m.channel == FINAL)
    return {i for i, m in enumerate(messages[:first_final]) if m.channel == ANALYSIS}


def _messages(conversation: Conversation | Iterable[Message]) -> list[Message]:
    messages = list(conversation.messages if isinstance(conversation, Conversation) else conversation)
    for i, message in enumerate(messages):
        validate_message(message, i)
    return messages


def render_conversation(conversation: Conversation | Iterable[Message],
                        config: RenderConversationConfig | None = None,
                        tokenizer: HarmonyTokenizer | None = None) -> list[int]:
    """All messages, without a trailing `<|start|>role` (earlier reasoning dropped per config)."""
    messages = _messages(conversation)
    tok = tokenizer or load_tokenizer()
    function_tools = has_function_tools(messages)
    skip = dropped_analysis(messages, config)
    out: list[int] = []
    for i, message in enumerate(messages):
        if i not in skip:
            out += render_message(message, tok, function_tools=function_tools, index=i)
    return out


def render_conversation_for_completion(conversation: Conversation | Iterable[Message],
                                       next_role: Role = Role.ASSISTANT,
                                       config: RenderConversationConfig | None = None,
                                       tokenizer: HarmonyTokenizer | None = None) -> list[int]:
    """The prompt for sampling: the conversation, then `<|start|>{next_role}`."""
    tok = tokenizer or load_tokenizer()
    try:
        role = Role(next_role)
    except ValueError:
        raise HarmonyError(f"unknown next role {next_role!r}") from None
    return render_conversation(conversation, config, tok) + [tok.start] + tok.encode(role.value)


def render_conversation_for_training(conversation: Conversation | Iterable[Message],
                                     config: RenderConversationConfig | None = None,
                                     tokenizer: HarmonyTokenizer | None = None) -> list[int]:
    """Like `render_conversation`, but a closing final answer ends with `<|return|>`.

    (As in openai-harmony the last token is replaced whenever the last message is an assistant
    message on `final`, even if it carries a recipient.)
    """
    messages = _messages(conversation)
    tok = tokenizer or load_tokenizer()
    out = render_conversation(messages, config, tok)
    if messages and Role(messages[-1].author.role) is Role.ASSISTANT and messages[-1].channel == FINAL:
        out[-1] = tok.return_
    return out


@dataclass
class RenderedExample:
    """A training sample: its tokens, and `(message index, start, stop)` token spans."""

    tokens: list[int]
    spans: list[tuple[int, int, int]]


def render_for_training(conversation: Conversation | Iterable[Message], trained_from: int,
                        tokenizer: HarmonyTokenizer | None = None) -> RenderedExample:
    """The training form of a conversation whose messages from `trained_from` on are trained.

    Earlier messages render as at inference (the analysis of every finished turn dropped: the
    model never sees stale reasoning); from `trained_from` on everything stays, the trained
    turn's reasoning included — unlike openai-harmony's default training render, which drops
    the reasoning of single-turn data. A closing final answer ends with `<|return|>`, a closing
    tool call with `<|call|>`, as the model emits them.
    """
    messages = _messages(conversation)
    tok = tokenizer or load_tokenizer()
    function_tools = has_function_tools(messages)
    skip = dropped_analysis(messages[:trained_from], RenderConversationConfig(
        drop_finished_turns=True))
    tokens: list[int] = []
    spans: list[tuple[int, int, int]] = []
    for i, message in enumerate(messages):
        if i in skip:
            continue
        start = len(tokens)
        tokens += render_message(message, tok, function_tools=function_tools, index=i)
        spans.append((i, start, len(tokens)))
    last = messages[-1] if messages else None
    if last is not None and Role(last.author.role) is Role.ASSISTANT and last.channel == "final" \
            and last.recipient is None:
        tokens[-1] = tok.return_
    return RenderedExample(tokens, spans)
