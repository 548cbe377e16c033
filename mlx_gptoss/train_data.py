"""Fine-tuning data: JSONL conversations -> token ids and the loss mask over them.

Two row shapes, told apart per row:
- the OpenAI chat shape, `{"messages": [...], "tools"?: [...], "reasoning_effort"?: ...}`, the
  assistant's reasoning in `thinking`, `reasoning` or `reasoning_content`, tool calls in
  `tool_calls`, tool results as `tool` messages; `system`/`developer` messages become the
  developer instructions and the system message is this project's default (no date: a date
  would make the tokens change with the calendar), as the Hugging Face template does;
- openai-harmony conversation JSON (`content` as typed parts, `channel`, `recipient`).

Rendering uses the project's renderer in its training form (`harmony.render_for_training`).
The loss covers the assistant tokens of the trained turn (the last one, or each in turn with
`per_turn`), except the `<|start|>assistant` the prompt itself supplies; `final_only` narrows
it to the final answer. Tool results and earlier turns are context only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import DataError, GptOssError, HarmonyError
from .harmony import (
    Author,
    Conversation,
    HarmonyTokenizer,
    Message,
    Role,
    TextContent,
    ToolDescription,
    render_for_training,
)
from .prompts import developer_message, system_message

REASONING_KEYS = ("thinking", "reasoning", "reasoning_content")
MASKS = ("assistant", "final")
OVERFLOW = ("truncate", "drop")




@dataclass
class Example:
    """One training sample: `tokens` and a 0/1 `weights` per token (1 = predicted with loss)."""

    tokens: np.ndarray
    weights: np.ndarray

    @property
    def trained(self) -> int:
        return int(self.weights.sum())


# --------------------------------------------------------------------------- OpenAI chat shape


def _text(value: Any, where: str) -> str:
    """A message's content: a string, a list of text parts, or null."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, dict) and part.get("type") == "text" and \
                    isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise DataError(f"{where}: content parts must be {{'type': 'text', 'text': ...}}")
        return "".join(parts)
    raise DataError(f"{where}: content must be a string or a list of text parts")


def _tools(raw: Any, where: str) -> list[ToolDescription]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise DataError(f"{where}: 'tools' must be a list")
    out = []
    for i, tool in enumerate(raw):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: tools[{i}] needs a function name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise DataError(f"{where}: tools[{i}].parameters must be a JSON object")
        out.append(ToolDescription.new(fn["name"], str(fn.get("description") or ""), params))
    return out


def _tool_call(call: Any, where: str) -> tuple[str, str, str | None]:
    """(name, arguments JSON text, id) of one OpenAI tool call."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise DataError(f"{where}: a tool call needs function.name")
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return fn["name"], args, call.get("id")


def chat_to_harmony(row: dict, where: str) -> list[Message]:
    """An OpenAI-shape row -> harmony messages (system, developer, then the turns)."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    instructions: list[str] = []
    body: list[Message] = []
    call_names: dict[str, str] = {}
    last_call: str | None = None
    for i, m in enumerate(messages):
        at = f"{where}: message {i}"
        if not isinstance(m, dict):
            raise DataError(f"{at}: must be a JSON object")
        role = m.get("role")
        if role in ("system", "developer"):
            instructions.append(_text(m.get("content"), at))
        elif role == "user":
            body.append(Message.from_role_and_content(Role.USER, _text(m.get("content"), at)))
        elif role == "assistant":
            reasoning = [m[k] for k in REASONING_KEYS if m.get(k)]
            if reasoning:
                if not isinstance(reasoning[0], str):
                    raise DataError(f"{at}: the reasoning must be a string")
                body.append(Message.from_role_and_content(Role.ASSISTANT, reasoning[0])
                            .with_channel("analysis"))
            content = _text(m.get("content"), at)
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise DataError(f"{at}: tool_calls must be a list")
            if content or not calls:
                body.append(Message.from_role_and_content(Role.ASSISTANT, content)
                            .with_channel("commentary" if calls else "final"))
            for call in calls:
                name, args, call_id = _tool_call(call, at)
                if call_id is not None:
                    call_names[str(call_id)] = name
                last_call = name
                body.append(Message.from_role_and_content(Role.ASSISTANT, args)
                            .with_channel("commentary").with_recipient(f"functions.{name}")
                            .with_content_type("<|constrain|>json"))
        elif role == "tool":
            name = m.get("name") or call_names.get(str(m.get("tool_call_id"))) or last_call
            if not isinstance(name, str):
                raise DataError(f"{at}: a tool message needs a name or a tool_call_id")
            body.append(Message(Author(Role.TOOL, f"functions.{name}"),
                                [TextContent(_text(m.get("content"), at))],
                                channel="commentary", recipient="assistant"))
        else:
            raise DataError(f"{at}: unknown role {role!r}")
    effort = row.get("reasoning_effort", "medium")
    try:
        header = [system_message(reasoning_effort=effort)]
    except GptOssError as e:
        raise DataError(f"{where}: {e}") from None
    dev = developer_message("\n\n".join(instructions) if instructions else None,
                            _tools(row.get("tools"), where))
    return header + ([dev] if dev is not None else []) + body


def is_harmony_row(row: dict) -> bool:
    """Whether a `{"messages": [...]}` row is openai-harmony JSON (else OpenAI chat shape)."""
    for m in row.get("messages") or []:
        if isinstance(m, dict) and ("channel" in m or "recipient" in m or any(
                isinstance(p, dict) and p.get("type") in ("system_content", "developer_content")
                for p in (m.get("content") if isinstance(m.get("content"), list) else []))):
            return True
    return False


def row_messages(row: Any, where: str) -> list[Message]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object with 'messages'")
    if is_harmony_row(row):
        try:
            return Conversation.from_dict({"messages": row["messages"]}).messages
        except HarmonyError as e:
            raise DataError(f"{where}: {e}") from None
    return chat_to_harmony(row, where)


# --------------------------------------------------------------------------- samples and masks


def assistant_turns(messages: list[Message]) -> list[tuple[int, int]]:
    """(first, last) message index of each assistant turn: the assistant messages (and tool
    results between them) that answer one user message."""
    turns: list[tuple[int, int]] = []
    start = None
    for i, m in enumerate(messages):
        role = Role(m.author.role)
        if role is Role.ASSISTANT:
            if start is None:
                start = i
                turns.append((i, i))
            else:
                turns[-1] = (start, i)
        elif role is not Role.TOOL:
            start = None
    return turns


def _weights(messages: list[Message], spans, first: int, tokens_len: int, mask: str,
             tokenizer: HarmonyTokenizer) -> np.ndarray:
    """1 on the tokens the model writes in the trained turn (see the module docstring)."""
    weights = np.zeros(tokens_len, dtype=np.float32)
    given = 1 + len(tokenizer.encode("assistant"))  # `<|start|>assistant` after a prompt
    previous_role = None
    for index, start, stop in spans:
        m = messages[index]
        role = Role(m.author.role)
        if index >= first and role is Role.ASSISTANT and (mask == "assistant" or
                                                          m.channel == "final"):
            offset = given if previous_role is not Role.ASSISTANT else 0
            weights[start + offset:stop] = 1
        previous_role = role
    return weights


def examples_from_messages(messages: list[Message], tokenizer: HarmonyTokenizer, *,
                           mask: str = "assistant", per_turn: bool = False
                           ) -> list[Example]:
    turns = assistant_turns(messages)
    if not turns:
        return []
    chosen = turns if per_turn else turns[-1:]
    out = []
    for first, last in chosen:
        sample = messages[: last + 1]
        rendered = render_for_training(sample, first, tokenizer)
        weights = _weights(sample, rendered.spans, first, len(rendered.tokens), mask, tokenizer)
        out.append(Example(np.array(rendered.tokens, dtype=np.int32), weights))
    return out


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            yield where, json.loads(line)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None


def load_examples(path: str | Path, tokenizer: HarmonyTokenizer, *, mask: str = "assistant",
                  per_turn: bool = False, max_seq_length: int | None = None,
                  overflow: str = "truncate", warn: Callable[[str], None] | None = None
                  ) -> list[Example]:
    """Every sample of a JSONL file, rendered and masked.

    A row longer than `max_seq_length` tokens is truncated (with a warning) or dropped, per
    `overflow`; a sample left with no trained token is dropped with a warning.
    """
    if mask not in MASKS:
        raise DataError(f"unknown loss mask {mask!r}; use one of {', '.join(MASKS)}")
    if overflow not in OVERFLOW:
        raise DataError(f"unknown overflow rule {overflow!r}; use one of {', '.join(OVERFLOW)}")
    warn = warn or (lambda line: None)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    out: list[Example] = []
    for where, row in _rows(path):
        messages = row_messages(row, where)
        try:
            examples = examples_from_messages(messages, tokenizer, mask=mask, per_turn=per_turn)
        except HarmonyError as e:
            raise DataError(f"{where}: {e}") from None
        if not examples:
            warn(f"{where}: no assistant message to train on; skipped")
        for ex in examples:
            if max_seq_length is not None and len(ex.tokens) > max_seq_length:
                if overflow == "drop":
                    warn(f"{where}: {len(ex.tokens)} tokens > --max-seq-length "
                         f"{max_seq_length}; dropped")
                    continue
                warn(f"{where}: {len(ex.tokens)} tokens > --max-seq-length {max_seq_length}; "
                     "truncated")
                ex = Example(ex.tokens[:max_seq_length], ex.weights[:max_seq_length])
            if ex.weights[1:].sum() == 0:
                warn(f"{where}: no trained token left; skipped")
                continue
            out.append(ex)
    return out


def data_files(data: str | Path) -> tuple[Path, Path | None]:
    """(train file, validation file or None) for a JSONL file or a directory holding
    `train.jsonl` (and optionally `valid.jsonl`), as `mlx_lm.lora` reads them."""
    data = Path(data)
    if data.is_dir():
        train = data / "train.jsonl"
        if not train.is_file():
            raise DataError(f"{data}: no train.jsonl in the data directory")
        valid = data / "valid.jsonl"
        return train, valid if valid.is_file() else None
    if not data.is_file():
        raise DataError(f"{data}: data file or directory not found")
    return data, None
