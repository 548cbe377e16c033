"""Test helpers that make generation follow a script.

`ForcedScript` is a logits processor for a real model: it forces the template's tokens and, at
`FREE` slots, lets the model pick any ordinary (non-control) token, so the output has a harmony
structure while its free text still depends on the model and its cache.

`ScriptedModel` is a fake model whose logits force whole scripted responses, chosen by how many
tool calls the context already holds: a tool-call loop runs with no weights at all.
"""
from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx

from mlx_gptoss.harmony import load_tokenizer

FREE = None
VOCAB = 201088
FIRST_SPECIAL = 199998


def harmony(text: str) -> list[int]:
    """Encode text with control tokens written inline, e.g. "<|channel|>final<|message|>Hi"."""
    tok = load_tokenizer()
    ids = tok.encoding.encode(text, allowed_special="all")
    return ids


def force(logits: mx.array, token: int) -> mx.array:
    return mx.where(mx.arange(logits.shape[-1]) == token, 0.0, -mx.inf).astype(logits.dtype)


class ForcedScript:
    """Force `template` (ids, FREE for model-chosen ordinary tokens), then `<|return|>`."""

    def __init__(self, template: list[int | None]):
        self.template = template
        self.return_ = load_tokenizer().return_

    def __call__(self, tokens: list[int], logits: mx.array) -> mx.array:
        step = len(tokens)
        if step >= len(self.template):
            return force(logits, self.return_)
        if self.template[step] is not None:
            return force(logits, self.template[step])
        return mx.where(mx.arange(logits.shape[-1]) >= FIRST_SPECIAL, -mx.inf, logits)


class TokenCache:
    """A layer cache that remembers token ids instead of keys (for `ScriptedModel`)."""

    def __init__(self):
        self.tokens: list[int] = []

    @property
    def offset(self) -> int:
        return len(self.tokens)

    length = offset
    state = ()
    nbytes = 0

    def can_trim(self, n: int) -> bool:
        return 0 <= n <= self.offset

    def trim(self, n: int) -> int:
        del self.tokens[len(self.tokens) - n:]
        return n

    def snapshot(self):
        return list(self.tokens)

    def restore(self, snapshot) -> None:
        self.tokens = list(snapshot)


class ScriptedModel:
    """Response k (token ids, ending with its stop token) is produced while the context holds
    k `<|call|>` tokens; every call records the context it saw in `contexts`."""

    def __init__(self, responses: list[list[int]]):
        tok = load_tokenizer()
        self.responses = responses
        self.call = tok.call
        self.stops = {tok.call, tok.return_}
        self.assistant_start = [tok.start] + tok.encode("assistant")
        self.prefills: list[list[int]] = []
        self.config = SimpleNamespace(vocab_size=tok.vocab_size)

    def make_cache(self, sliding_slack: int = 0):
        return [TokenCache()]

    def next_token(self, context: list[int]) -> int:
        if context[-1] in self.stops:  # the engine's speculative step past a stop: discarded
            return context[-1]
        response = self.responses[min(context.count(self.call), len(self.responses) - 1)]
        head = len(self.assistant_start)
        for done in range(len(response) - 1, -1, -1):
            before = context[:len(context) - done]
            if before[-head:] == self.assistant_start and context[len(before):] == response[:done]:
                return response[done]
        raise AssertionError("the context does not end inside a scripted response")

    def __call__(self, inputs: mx.array, cache=None, **options) -> mx.array:
        ids = [int(t) for t in inputs[0].tolist()]
        cache[0].tokens.extend(ids)
        if len(ids) > 1 or cache[0].offset == len(ids):
            self.prefills.append(ids)
        token = self.next_token(cache[0].tokens)
        logits = mx.full((1, len(ids), VOCAB), -mx.inf)
        logits[..., token] = 0.0
        return logits
