"""`tool_choice: "required"` or a named function, guaranteed: the reply opens with a call.

`ForcedCallHeader` is a logits processor that lets through only the tokens of
`<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>` for one of the allowed
names (a trie over their token sequences), so even a random-weight model starts a call; the
arguments are then constrained by the JSON Schema constraint (`JsonSchemaConstraint`, which
reads the same header) and the message ends with `<|call|>`.

The call comes first: no analysis is generated before it. That is the price of a guarantee
that holds for any model today; it is meant to be replaced by the constraint API's own
`tool_choice` (issue 13), which may allow bounded reasoning first.
"""
from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from ..harmony import HarmonyTokenizer
from .convert import JSON_CONTENT_TYPE


class ForcedCallHeader:
    """Force a call header to one of `names` over the first generated tokens."""

    def __init__(self, tokenizer: HarmonyTokenizer, names: Sequence[str]):
        if not names:
            raise ValueError("a forced call needs at least one function name")
        suffix = [tokenizer.constrain, *tokenizer.encode(JSON_CONTENT_TYPE[len("<|constrain|>"):]),
                  tokenizer.message]
        self.sequences = [[tokenizer.channel, *tokenizer.encode(f"commentary to=functions.{name} "),
                           *suffix] for name in names]

    def allowed(self, generated: Sequence[int]) -> set[int] | None:
        """The tokens that may come next, or None once a header is complete."""
        step = len(generated)
        prefix = list(generated)
        options = {seq[step] for seq in self.sequences if len(seq) > step and seq[:step] == prefix}
        if not options and any(seq == prefix[:len(seq)] for seq in self.sequences):
            return None
        return options

    def __call__(self, tokens: Sequence[int], logits: mx.array) -> mx.array:
        if len(tokens) > max(len(s) for s in self.sequences):
            return logits
        options = self.allowed(tokens)
        if options is None:
            return logits
        if not options:  # cannot happen while only this processor picks the header
            raise RuntimeError("the forced call header was left")
        keep = mx.zeros(logits.shape[-1], dtype=mx.bool_)
        keep[mx.array(sorted(options))] = True
        return mx.where(keep, logits, -mx.inf)
