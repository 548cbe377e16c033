"""Streaming parser for harmony token streams (model output, or whole rendered conversations).

Tokens go in one at a time (`StreamParser.feed`), events come out:

- `MessageStart` when `<|message|>` closes a header (only then are channel, recipient and
  content type known),
- `TextDelta` for content, never splitting a UTF-8 character across deltas,
- `MessageEnd` at `<|end|>`, `<|call|>`, `<|return|>` or end of stream, followed by
  `ToolCall` (at `<|call|>`) or `AnswerDone` (at `<|return|>`),
- `Recovery` (lenient mode) whenever malformed input was repaired.

Strict mode reproduces openai-harmony 0.0.8's `StreamableParser` (same messages, errors where it
errs) and raises `HarmonyError` naming the token. Lenient mode, the default for model output,
never raises: headers without `<|message|>`, text with no header (taken as an assistant answer
on `final`), stray or unknown tokens, a new `<|start|>` inside a message, EOS inside a header are
all repaired, the text kept and the repair reported. It also moves a lone `<|constrain|>json`
from recipient to content type and prefixes a bare `to=name` with `functions.`.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Union

from ..errors import HarmonyError
from .constants import (FINAL, STOP_CALL, STOP_END, STOP_RECOVERED, STOP_RETURN,
                        STOP_STREAM_END)
from .messages import Author, Message, Role, TextContent
from .tokenizer import HarmonyTokenizer, load_tokenizer

CHANNEL_MARK = "<|channel|>"
CONSTRAIN_MARK = "<|constrain|>"
REPLACEMENT = "\ufffd"
# Recipients that are not functions: built-in tools and roles (tool results go `to=assistant`).
BARE_RECIPIENTS = frozenset({"python", "assistant", "user", "system", "developer", "all"})
# A lenient header longer than this, or with a newline, is taken to be text with no header.
MAX_HEADER_TOKENS = 64

# Rust's `char::is_whitespace` (Unicode White_Space) and `u8::is_ascii_whitespace`.
_UNICODE_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007" \
              "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_ASCII_WS = re.compile(r"[ \t\n\x0c\r]+")
_CHANNEL_END = re.compile(f"[{re.escape(_UNICODE_WS)}<]")


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class MessageStart:
    index: int
    author: Author
    channel: str | None
    recipient: str | None
    content_type: str | None


@dataclass(frozen=True)
class TextDelta:
    index: int
    text: str


@dataclass(frozen=True)
class MessageEnd:
    """`stop` is the closing token's name ("end", "call", "return"), "stream_end" when the
    tokens ran out mid-message, or "recovered" (see harmony/constants.py)."""

    index: int
    message: Message
    stop: str


@dataclass(frozen=True)
class ToolCall:
    """An assistant message to a tool (`recipient`) closed by `<|call|>`; arguments = text."""

    index: int
    message: Message

    @property
    def recipient(self) -> str | None:
        return self.message.recipient

    @property
    def arguments(self) -> str:
        return self.message.text()


@dataclass(frozen=True)
class AnswerDone:
    """`<|return|>`: the assistant finished its answer; sampling stops."""

    index: int
    message: Message


@dataclass(frozen=True)
class Recovery:
    """Lenient mode repaired something at token position `token_index`."""

    token_index: int
    reason: str


Event = Union[MessageStart, TextDelta, MessageEnd, ToolCall, AnswerDone, Recovery]


class State(Enum):
    EXPECT_START = "ExpectStart"
    HEADER = "Header"
    CONTENT = "Content"


# --------------------------------------------------------------------------- headers


@dataclass
class Header:
    author: Author
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None


class _HeaderError(Exception):
    pass


def _take_channel(text: str, lenient: bool) -> tuple[str | None, str]:
    """Cut `<|channel|>value` out of the header text (value ends at whitespace or `<`)."""
    at = text.find(CHANNEL_MARK)
    if at < 0:
        return None, text
    after = text[at + len(CHANNEL_MARK):]
    match = _CHANNEL_END.search(after)
    end = match.start() if match else len(after)
    if end == 0 and not lenient:
        raise _HeaderError("channel marker present but no channel value found in header")
    return after[:end] or None, text[:at] + after[end:]


def _parts(text: str) -> list[str]:
    text = text.strip(_UNICODE_WS)
    if CONSTRAIN_MARK in text:
        text = text.replace(CONSTRAIN_MARK, " " + CONSTRAIN_MARK).strip(_UNICODE_WS)
    return [p for p in _ASCII_WS.split(text) if p]


def _role_of(parts: list[str], role: Role | None) -> tuple[Role, str | None]:
    """The author role (and tool name); removes the role word from `parts` (oracle rules)."""
    name = None
    if role is None:
        if not parts:
            raise _HeaderError("message header did not contain a role")
        word = parts[0]
        try:
            role = Role(word)
        except ValueError:
            if len(parts) > 1 or word.startswith("to="):
                parts.pop(0)
                role = Role.TOOL
            else:
                raise _HeaderError(f"Unknown role: {word}") from None
        if role is Role.TOOL:
            name = word
    if parts and parts[0] == role.value:
        parts.pop(0)
    return role, name


def parse_header(text: str, role: Role | None) -> Header:
    """openai-harmony 0.0.8's header rules; raises _HeaderError where it fails."""
    channel, rest = _take_channel(text, lenient=False)
    parts = _parts(rest)
    role, name = _role_of(parts, role)
    header = Header(Author(role, name), channel)
    if parts:
        count = len(parts)
        last = parts.pop()
        if last.startswith("to="):
            header.recipient = last[3:]
        elif count == 1:
            header.recipient = last
        else:
            header.content_type = last
            if parts:
                raw = parts.pop()
                header.recipient = raw[3:] if raw.startswith("to=") else raw
    if parts:
        raise _HeaderError(f"unexpected tokens remaining in message header: {' '.join(parts)!r}")
    return header


def _lenient_header(text: str, role: Role | None) -> tuple[Header, list[str]]:
    """Best effort for a header the oracle rejects; returns it and the words left over."""
    channel, rest = _take_channel(text, lenient=True)
    parts = _parts(rest.replace(CHANNEL_MARK, " "))
    try:
        role, name = _role_of(parts, role)
    except _HeaderError:
        role, name = Role.ASSISTANT, None
        if parts:  # `user:bob` (a named author) or a lone tool name
            word, _, named = parts.pop(0).partition(":")
            known = {r.value for r in Role}
            role, name = (Role(word), named or None) if word in known else (Role.TOOL, word)
    header = Header(Author(role, name), channel)
    leftover = []
    for part in parts:
        if part.startswith("to=") and header.recipient is None:
            header.recipient = part[3:]
        elif part.startswith(CONSTRAIN_MARK) and header.content_type is None:
            header.content_type = part
        else:
            leftover.append(part)
    return header, leftover


# --------------------------------------------------------------------------- the parser


def _as_id(token) -> int | None:
    """A Python int from any integer-like id (numpy, mlx scalars); None if it is not one."""
    try:
        return operator.index(token)
    except TypeError:
        try:
            return operator.index(token.item())
        except (AttributeError, TypeError, ValueError):
            return None


class StreamParser:
    """Incremental harmony parser; see the module docstring.

    `role` is the role whose header is already in the prompt (`<|start|>assistant` ends a
    completion prompt), or None when the stream starts with `<|start|>`.
    """

    def __init__(self, tokenizer: HarmonyTokenizer | None = None, role: Role | None = Role.ASSISTANT,
                 *, strict: bool = False):
        self.tok = tokenizer or load_tokenizer()
        self.strict = strict
        self.messages: list[Message] = []
        self.recoveries: list[Recovery] = []
        self.tokens: list[int] = []
        self.next_role = None if role is None else Role(role)
        self.state = State.HEADER if role is not None else State.EXPECT_START
        self.header_tokens: list[int] = []
        self.headless = False  # lenient: a header we started without seeing <|start|>
        self.header: Header | None = None
        self.text_parts: list[str] = []
        self.pending = b""
        self.last_delta: str | None = None
        # Where the open (or last) message's content starts in `tokens`, and the index of the
        # token that closed it (len(tokens) for end of stream; None while open): lets a logits
        # processor bound to this parser find a message's content tokens without parsing again.
        self.content_start = 0
        self.content_stop: int | None = None
        self._position = 0  # index in `tokens` of the token being read (len(tokens) at finish)
        self._events: list[Event] = []
        tok = self.tok
        self._stops = {tok.end: STOP_END, tok.call: STOP_CALL, tok.return_: STOP_RETURN}

    # ----------------------------------------------------------------- public API

    def feed(self, token: int) -> list[Event]:
        """Process one token; return the events it caused."""
        self._events = []
        token = _as_id(token)
        self._position = len(self.tokens)
        self.tokens.append(token)
        if token is None or not 0 <= token < self.tok.vocab_size:
            self._fail(f"token {token!r} is outside the vocabulary")
            self._recover(f"dropped token id {token!r} outside the vocabulary")
            return self._events
        if token == self.tok.endoftext and not self.strict:
            self._recover("<|endoftext|> taken as end of stream")
            self._eos()
            return self._events
        {State.EXPECT_START: self._expect_start, State.HEADER: self._in_header,
         State.CONTENT: self._in_content}[self.state](token)
        return self._events

    def feed_all(self, tokens: Iterable[int]) -> list[Event]:
        events: list[Event] = []
        for token in tokens:
            events += self.feed(token)
        return events

    def finish(self) -> list[Event]:
        """End of stream: close the open message (or repair/raise for an open header)."""
        self._events = []
        self._position = len(self.tokens)
        self._eos()
        return self._events

    @property
    def current_role(self) -> Role | None:
        if self.state is State.CONTENT:
            return self.header.author.role
        return self.next_role

    @property
    def current_channel(self) -> str | None:
        return self.header.channel if self.state is State.CONTENT else None

    @property
    def current_recipient(self) -> str | None:
        return self.header.recipient if self.state is State.CONTENT else None

    @property
    def current_content_type(self) -> str | None:
        return self.header.content_type if self.state is State.CONTENT else None

    @property
    def current_text(self) -> str:
        return "".join(self.text_parts) if self.state is State.CONTENT else ""

    # ----------------------------------------------------------------- helpers

    def _where(self) -> str:
        return f"token {len(self.tokens) - 1}"

    def _fail(self, what: str, where: str | None = None) -> None:
        if self.strict:
            raise HarmonyError(f"{where or self._where()}: {what}")

    def _recover(self, reason: str) -> None:
        event = Recovery(max(len(self.tokens) - 1, 0), reason)
        self.recoveries.append(event)
        self._events.append(event)

    def _name(self, token: int) -> str:
        return self.tok.decode([token]) if self.tok.is_special(token) else repr(self.tok.decode([token]))

    # ----------------------------------------------------------------- states

    def _expect_start(self, token: int) -> None:
        tok = self.tok
        if token == tok.start:
            self._begin_header(None, [])
            return
        self._fail(f"unexpected {self._name(token)} while expecting <|start|>")
        if token in self._stops:
            self._recover(f"ignored stray {self._name(token)} between messages")
        elif token == tok.channel:
            self._recover("<|channel|> without <|start|>: assumed an assistant header")
            self._begin_header(Role.ASSISTANT, [token], headless=True)
        elif token == tok.message:
            self._recover("<|message|> without a header: assumed an assistant message")
            self._open(Header(Author(Role.ASSISTANT), FINAL))
        elif tok.is_special(token):
            self._recover(f"ignored stray {self._name(token)} between messages")
        else:
            self._recover("text without a header: assumed the assistant")
            self._begin_header(Role.ASSISTANT, [token], headless=True)
            self._check_header_is_text()

    def _begin_header(self, role: Role | None, tokens: list[int], headless: bool = False) -> None:
        self.state = State.HEADER
        self.next_role = role
        self.header_tokens = tokens
        self.headless = headless

    def _in_header(self, token: int) -> None:
        tok = self.tok
        if token == tok.message:
            self._close_header()
        elif not self.strict and token in self._stops:
            self._header_as_text(self._stops[token])
        elif not self.strict and token == tok.start:
            dropped = tok.decode(self.header_tokens)
            self._recover(f"<|start|> inside a header: dropped the partial header {dropped!r}")
            self._begin_header(None, [])
        elif not self.strict and tok.is_special(token) and token not in (tok.channel, tok.constrain):
            self._recover(f"ignored stray {self._name(token)} in a header")
        else:
            self.header_tokens.append(token)
            if not self.strict:
                self._check_header_is_text()

    def _check_header_is_text(self) -> None:
        """Lenient: a long header or one with a newline is really text with no header."""
        if len(self.header_tokens) > MAX_HEADER_TOKENS or b"\n" in self.tok.decode_bytes(self.header_tokens):
            self._recover("header without <|message|>: kept as message text")
            self._open_as_text()

    def _header_and_text(self) -> tuple[Header, str]:
        """Lenient reading of an unfinished header: channel and role, the rest is text."""
        raw = self.tok.decode(self.header_tokens)
        channel, rest = _take_channel(raw, lenient=True)
        role = self.next_role
        stripped = rest.lstrip(_UNICODE_WS)
        word = _ASCII_WS.split(stripped, maxsplit=1)[0] if stripped else ""
        if role is None and word in {r.value for r in Role}:
            role = Role(word)
        if role is not None and word == role.value:
            stripped = stripped[len(word):]
        role = role or Role.ASSISTANT
        if channel is None and role is Role.ASSISTANT:
            channel = FINAL
        return Header(Author(role), channel), stripped.lstrip(_UNICODE_WS)

    def _header_as_text(self, stop: str) -> None:
        closer = "end of stream" if stop == STOP_STREAM_END else f"<|{stop}|>"
        # Nothing at all after the role (an empty completion) is no message, not an empty one.
        if not self.header_tokens and (self.next_role is None or stop == STOP_STREAM_END):
            self._recover(f"empty header closed by {closer}: ignored")
            self.state = State.EXPECT_START
            return
        self._recover(f"header closed by {closer} without <|message|>: kept as message text")
        self._open_as_text()
        self._close(stop)

    def _open_as_text(self) -> None:
        header, text = self._header_and_text()
        self._open(header)
        if text:
            self._add_bytes(text.encode("utf-8"))

    def _close_header(self) -> None:
        data = self.tok.decode_bytes(self.header_tokens)
        try:
            text = data.decode("utf-8")
            header = parse_header(text, self.next_role)
        except (UnicodeDecodeError, _HeaderError) as e:
            reason = "could not decode header" if isinstance(e, UnicodeDecodeError) else str(e)
            self._fail(reason)
            if self.headless:
                self._recover(f"text without a header before <|message|> ({reason}): kept as text")
                self._open_as_text()
                return
            header, leftover = _lenient_header(data.decode("utf-8", "replace"), self.next_role)
            self._recover(f"malformed header ({reason}); ignored {' '.join(leftover)!r}")
        if not self.strict:
            self._tidy(header)
            if self.headless:
                self._recover("message without <|start|>")
        self._open(header)

    def _tidy(self, header: Header) -> None:
        """Lenient fixes for known model slips in otherwise valid headers."""
        if header.recipient and header.recipient.startswith(CONSTRAIN_MARK) and header.content_type is None:
            header.content_type, header.recipient = header.recipient, None
            self._recover(f"{header.content_type!r} taken as content type, not recipient")
        r = header.recipient
        if (r and header.author.role is Role.ASSISTANT and "." not in r
                and r not in BARE_RECIPIENTS and not r.startswith("<|")):
            header.recipient = f"functions.{r}"
            self._recover(f"recipient {r!r} normalised to {header.recipient!r}")

    def _open(self, header: Header) -> None:
        self.header = header
        self.state = State.CONTENT
        self.next_role = None
        self.header_tokens = []
        self.headless = False
        self.text_parts = []
        self.pending = b""
        self.content_start = len(self.tokens)
        self.content_stop = None
        self._events.append(MessageStart(len(self.messages), header.author, header.channel,
                                         header.recipient, header.content_type))

    def _in_content(self, token: int) -> None:
        tok = self.tok
        if token in self._stops:
            self._close(self._stops[token])
        elif self.strict or not tok.is_special(token):
            self._add_bytes(tok.token_bytes(token))
        elif token == tok.start:
            self._recover("<|start|> inside a message: closed the message")
            self._close(STOP_RECOVERED)
            self._begin_header(None, [])
        elif token == tok.channel:
            role = self.header.author.role
            self._recover("<|channel|> inside a message: closed it and started a new one")
            self._close(STOP_RECOVERED)
            self._begin_header(role, [token])
        else:
            self._recover(f"ignored stray {self._name(token)} inside a message")

    def _add_bytes(self, data: bytes) -> None:
        """Emit the valid UTF-8 so far; keep an unfinished character for the next token."""
        self.pending += data
        try:
            delta = self.pending.decode("utf-8")
            self.pending = b""
        except UnicodeDecodeError as e:
            delta = self.pending[:e.start].decode("utf-8")
            self.pending = self.pending[e.start:]
            if e.reason != "unexpected end of data":
                delta += REPLACEMENT
                self.pending = self.pending[e.end - e.start:]
        self._delta(delta or None)

    def _delta(self, text: str | None) -> None:
        self.last_delta = text
        if text:
            self.text_parts.append(text)
            self._events.append(TextDelta(len(self.messages), text))

    def _close(self, stop: str) -> None:
        if self.pending:
            self._delta(self.pending.decode("utf-8", "replace"))
        self.last_delta = None
        h = self.header
        self.content_stop = max(self._position, self.content_start)
        message = Message(h.author, [TextContent("".join(self.text_parts))], h.channel,
                          h.recipient, h.content_type)
        index = len(self.messages)
        self.messages.append(message)
        self._events.append(MessageEnd(index, message, stop))
        if stop == STOP_CALL:
            if message.recipient is None:
                self._recover("<|call|> closed a message without a recipient")
            else:
                self._events.append(ToolCall(index, message))
        elif stop == STOP_RETURN:
            self._events.append(AnswerDone(index, message))
        self.state = State.EXPECT_START
        self.header = None
        self.text_parts = []
        self.pending = b""

    def _eos(self) -> None:
        if self.state is State.CONTENT:
            self._close(STOP_STREAM_END)
        elif self.state is State.HEADER:
            self._fail("the stream ended inside a message header",
                       f"end of stream after {len(self.tokens)} tokens")
            self._header_as_text(STOP_STREAM_END)
            self.state = State.EXPECT_START


def parse_messages(tokens: Iterable[int], role: Role | None = Role.ASSISTANT, *, strict: bool = False,
                   tokenizer: HarmonyTokenizer | None = None) -> list[Message]:
    """Parse a whole token list (then end of stream) into messages.

    Lenient by default, unlike openai-harmony's `parse_messages_from_completion_tokens`;
    `strict=True` gives its results and errors.
    """
    parser = StreamParser(tokenizer, role, strict=strict)
    parser.feed_all(tokens)
    parser.finish()
    return parser.messages


def parser_after(prompt: Iterable[int], tokenizer: HarmonyTokenizer | None = None) -> StreamParser:
    """A lenient parser for what is generated after `prompt`.

    Only the prompt's last message can still be open, so the parser reads from its last
    `<|start|>`: a prompt ending `<|start|>assistant` leaves it in that header, one ending
    `...<|channel|>final<|message|>` leaves it inside the final message, so the generated
    tokens are read as that message's content. Without `<|start|>` the prompt is taken to
    continue an assistant header (the completion convention).
    """
    prompt = [int(t) for t in prompt]
    parser = StreamParser(tokenizer, Role.ASSISTANT)
    start = parser.tok.start
    if start in prompt:
        prompt = prompt[len(prompt) - 1 - prompt[::-1].index(start):]
        parser = StreamParser(parser.tok, None)
    parser.feed_all(prompt)
    return parser
