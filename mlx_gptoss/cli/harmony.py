"""`mlx-gptoss harmony`: look at prompts the way the model sees them.

`render CONV.json` prints the token ids of a conversation (openai-harmony JSON) rendered for
completion; `parse IDS.json` turns a JSON array of token ids back into harmony JSON messages.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..env import parse_json, read_json
from ..errors import HarmonyError
from ..harmony import (
    Conversation,
    Role,
    StreamParser,
    load_tokenizer,
    render_conversation,
    render_conversation_for_completion,
)

app = typer.Typer(help="Render and parse harmony prompts (gpt-oss's chat format).",
                  no_args_is_help=True, add_completion=False, rich_markup_mode=None)


STDIN = "-"


def _read_json(path: Path, what: str, expect: type):
    """The JSON in `path` (`-`: stdin), or one HarmonyError line naming it."""
    if str(path) == STDIN:
        return parse_json(sys.stdin.buffer.read(), f"{what} on stdin", expect=expect,
                          error=HarmonyError)
    return read_json(path, what, expect=expect, error=HarmonyError)


def _role(name: str) -> Role:
    try:
        return Role(name)
    except ValueError:
        raise HarmonyError(f"unknown role {name!r} (expected one of "
                           f"{', '.join(r.value for r in Role)})") from None


@app.command()
def render(
    conversation: Path = typer.Argument(..., help="Conversation JSON (openai-harmony's to_json); "
                                        "- reads stdin."),
    no_completion: bool = typer.Option(False, "--no-completion",
                                       help="Leave out the trailing <|start|>ROLE."),
    next_role: str = typer.Option("assistant", "--next-role", help="Role that speaks next."),
    text: bool = typer.Option(False, "--text", help="Print the decoded text, not ids (a control "
                              "token and the same characters typed as text look alike here)."),
    tokens: bool = typer.Option(False, "--tokens", help="One token per line: id, 'special' "
                                "for a real control token, and its text as a JSON string."),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="Path to o200k_base.tiktoken."),
) -> None:
    """Print the token ids of CONVERSATION rendered for completion, as a JSON array."""
    if text and tokens:
        raise HarmonyError("--text and --tokens are two views: pick one")
    data = _read_json(conversation, "conversation", dict)
    try:
        conv = Conversation.from_dict(data)
    except HarmonyError as e:
        where = "stdin" if str(conversation) == STDIN else conversation
        raise HarmonyError(f"{where}: {e}") from None
    tok = load_tokenizer(vocab_path=vocab)
    if no_completion:
        ids = render_conversation(conv, tokenizer=tok)
    else:
        ids = render_conversation_for_completion(conv, _role(next_role), tokenizer=tok)
    if tokens:
        typer.echo(token_table(tok, ids))
    else:
        typer.echo(tok.decode(ids) if text else json.dumps(ids))


def token_table(tok, ids: list[int]) -> str:
    """`id  special|text  "decoded"` per token: the one view where an injected `<|start|>`
    (plain text, several ordinary tokens) cannot pass for the control token."""
    rows = []
    for i in ids:
        kind = "special" if tok.is_special(i) else "text"
        rows.append(f"{i:>6}  {kind:<7}  {json.dumps(tok.decode([i]), ensure_ascii=False)}")
    return "\n".join(rows)


@app.command()
def parse(
    ids_file: Path = typer.Argument(..., help="JSON array of token ids; - reads stdin."),
    role: str = typer.Option("assistant", "--role",
                             help="Role whose header precedes the ids ('none' if they begin "
                                  "with <|start|>)."),
    strict: bool = typer.Option(False, "--strict", help="Fail on malformed input."),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="Path to o200k_base.tiktoken."),
) -> None:
    """Print the messages in IDS_FILE as harmony JSON ({"messages": [...]})."""
    ids = _read_json(ids_file, "token ids", list)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise HarmonyError(f"{ids_file} must hold a JSON array of integer token ids")
    tok = load_tokenizer(vocab_path=vocab)
    start_role = None if role.lower() == "none" else _role(role)
    parser = StreamParser(tok, start_role, strict=strict)
    parser.feed_all(ids)
    parser.finish()
    for repair in parser.recoveries:
        typer.echo(f"warning: token {repair.token_index}: {repair.reason}", err=True)
    typer.echo(Conversation(parser.messages).to_json())
