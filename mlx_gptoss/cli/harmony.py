"""`mlx-gptoss harmony`: look at prompts the way the model sees them.

`render CONV.json` prints the token ids of a conversation (openai-harmony JSON) rendered for
completion; `parse IDS.json` turns a JSON array of token ids back into harmony JSON messages.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

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
                  no_args_is_help=True, add_completion=False)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HarmonyError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None


def _role(name: str) -> Role:
    try:
        return Role(name)
    except ValueError:
        raise HarmonyError(f"unknown role {name!r} (expected one of "
                           f"{', '.join(r.value for r in Role)})") from None


@app.command()
def render(
    conversation: Path = typer.Argument(..., help="Conversation JSON (openai-harmony's to_json)."),
    no_completion: bool = typer.Option(False, "--no-completion",
                                       help="Leave out the trailing <|start|>ROLE."),
    next_role: str = typer.Option("assistant", "--next-role", help="Role that speaks next."),
    text: bool = typer.Option(False, "--text", help="Print the decoded text, not ids."),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="Path to o200k_base.tiktoken."),
) -> None:
    """Print the token ids of CONVERSATION rendered for completion, as a JSON array."""
    conv = Conversation.from_json(_read(conversation, "conversation"))
    tok = load_tokenizer(vocab_path=vocab)
    if no_completion:
        ids = render_conversation(conv, tokenizer=tok)
    else:
        ids = render_conversation_for_completion(conv, _role(next_role), tokenizer=tok)
    typer.echo(tok.decode(ids) if text else json.dumps(ids))


@app.command()
def parse(
    ids_file: Path = typer.Argument(..., help="JSON array of token ids."),
    role: str = typer.Option("assistant", "--role",
                             help="Role whose header precedes the ids ('none' if they begin "
                                  "with <|start|>)."),
    strict: bool = typer.Option(False, "--strict", help="Fail on malformed input."),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="Path to o200k_base.tiktoken."),
) -> None:
    """Print the messages in IDS_FILE as harmony JSON ({"messages": [...]})."""
    try:
        ids = json.loads(_read(ids_file, "token ids"))
    except ValueError as e:
        raise HarmonyError(f"{ids_file} is not valid JSON: {e}") from None
    if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        raise HarmonyError(f"{ids_file} must hold a JSON array of integer token ids")
    tok = load_tokenizer(vocab_path=vocab)
    start_role = None if role.lower() == "none" else _role(role)
    parser = StreamParser(tok, start_role, strict=strict)
    parser.feed_all(ids)
    parser.finish()
    for repair in parser.recoveries:
        typer.echo(f"warning: token {repair.token_index}: {repair.reason}", err=True)
    typer.echo(Conversation(parser.messages).to_json())
