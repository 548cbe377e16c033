"""Structured output: JSON that validates against a schema by construction, not by hope.

A `JsonSchemaConstraint` compiles the answer's schema (and each function tool's parameter
schema) once, before generation, so a bad schema fails early with `SchemaError`. Its
`processor()` is a logits processor `(tokens so far, logits) -> logits` for one generation: it
follows the harmony stream with its own `StreamParser`, leaves the analysis channel free, and
from the first content token of the final message (or of a `functions.NAME <|constrain|>json`
call) masks every token the schema forbids. When the JSON is complete only `<|return|>` (answer)
or `<|call|>` (tool call) is left, so the message ends there.

The mask is llguidance's bitmask (one bit per token, 6284 int32 words for 201088 tokens), filled
in place into a reusable buffer and expanded inside MLX (`mx.where` on the shifted words), so no
per-token array of the whole vocabulary is built in Python or NumPy.

Library choice (measured here on the o200k_harmony vocabulary, 2-core x86 CPU):

| | llguidance 1.9.1 | xgrammar 0.2.8 | outlines-core 0.2.14 |
| --- | --- | --- | --- |
| install | wheel, no dependencies | needs torch, transformers, triton, tvm-ffi | wheel, no dependencies |
| tiktoken vocab | `from_tiktoken`, 1.6 s once | raw byte vocab, 0.1 s | byte vocab, 0.5 s |
| compile a schema | ~1 ms | ~300 ms | 0.7 s (regex index) |
| mask per token | 0.03-4 ms, median 0.04 | 0.003-21 ms | 0.001-5 ms, as a Python list of ids |
| recursion ($ref) | yes (CFG) | yes | unrolled to a fixed depth (regex) |
| invalid schema | clear error (min > max, bad regex, bad types) | error text with C++ source paths | accepts min > max, look-behind |

llguidance wins on dependencies, compile time and error quality, with masks as fast as the
rest (vLLM and SGLang use it as a structured-output backend too).

Whitespace between JSON tokens is limited to 16 characters per gap (enough to pretty-print a few
levels deep; a schema's `x-guidance` options can override it): an unbounded gap lets a confused
model stall in whitespace forever.

Limits: the schema's own semantics are kept (without `additionalProperties: false` the model may
add keys; without `maxLength` a string may run on), so a confused model can still reach
`max_tokens` before the JSON closes: the result then says `stop == "length"`. Cost: about
0.04 ms of llguidance and 0.2 ms of MLX masking per constrained token on this CPU
(`constraint_cost`, `benchmarks/constrained_cost.py`).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import llguidance
import llguidance.tiktoken
import mlx.core as mx
import numpy as np

from .env import check_depth, parse_json, read_json
from .errors import SchemaError
from .harmony.messages import ResponseFormat, Role, ToolDescription
from .harmony.parser import State, StreamParser
from .harmony.tokenizer import VOCAB_SIZE, HarmonyTokenizer

WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"
MASK_WORDS = (VOCAB_SIZE + 31) // 32
FUNCTIONS = "functions."
# What a tool without a parameter schema may receive: any JSON object.
ANY_OBJECT: dict[str, Any] = {"type": "object"}

Schema = dict | bool


# --------------------------------------------------------------------------- schemas


def json_schema_of(schema: Any) -> Schema:
    """A JSON Schema from a dict (or bool), JSON text, or a pydantic model class."""
    if isinstance(schema, (dict, bool)):
        return check_depth(schema, "JSON Schema", SchemaError)
    if isinstance(schema, str):
        return json_schema_of(parse_json(schema, "JSON Schema text", error=SchemaError))
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return schema.model_json_schema()
    raise SchemaError(f"a JSON Schema must be a dict or a pydantic model class, got {type(schema).__name__}")


def load_json_schema(path: str | Path) -> Schema:
    """Read a schema file (for `--json-schema FILE`); errors name the file."""
    return read_json(path, "JSON Schema", expect=(dict, bool), error=SchemaError)


def response_format_of(schema: Any, name: str | None = None,
                       description: str | None = None) -> ResponseFormat:
    """The developer message's response-format entry that tells the model about the schema."""
    resolved = json_schema_of(schema)
    if name is None:
        title = resolved.get("title") if isinstance(resolved, dict) else None
        name = getattr(schema, "__name__", None) or title or "response"
    if description is None and isinstance(resolved, dict):
        description = resolved.get("description")
    return ResponseFormat(name, resolved if isinstance(resolved, dict) else {}, description)


@functools.lru_cache(maxsize=4)
def guidance_tokenizer(tokenizer: HarmonyTokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of o200k_harmony (built once, ~1.5 s); its EOS is `<|return|>`."""
    return llguidance.tiktoken.lltokenizer_from_encoding(
        tokenizer.encoding, n_vocab=VOCAB_SIZE, eos_token=tokenizer.return_)


@dataclass(frozen=True)
class CompiledSchema:
    """A schema compiled for the tokenizer; `matcher()` gives a fresh copy per message."""

    schema: Schema
    template: llguidance.LLMatcher

    def matcher(self) -> llguidance.LLMatcher:
        return self.template.deep_copy()


def compile_schema(tokenizer: HarmonyTokenizer, schema: Any, what: str = "response format") -> CompiledSchema:
    """Compile once; an invalid or unsupported schema raises `SchemaError` naming `what`."""
    resolved = json_schema_of(schema)
    if resolved is False:
        raise SchemaError(f"{what}: the schema is false, so no JSON value satisfies it")
    if resolved is True:
        resolved = {}
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            resolved, defaults={"whitespace_pattern": WHITESPACE})
    except (ValueError, TypeError) as e:
        raise SchemaError(f"{what}: invalid JSON Schema ({e})") from None
    matcher = llguidance.LLMatcher(guidance_tokenizer(tokenizer), grammar, log_level=0)
    if matcher.is_error():
        reason = " ".join(matcher.get_error().split())
        raise SchemaError(f"{what}: cannot use this JSON Schema ({reason})")
    return CompiledSchema(resolved, matcher)


# --------------------------------------------------------------------------- the mask in MLX

_BIT_SHIFTS = mx.arange(32, dtype=mx.uint32)


@mx.compile
def _masked(logits: mx.array, words: mx.array) -> mx.array:
    allowed = ((words[:, None] >> _BIT_SHIFTS) & 1).reshape(-1).astype(mx.bool_)
    return mx.where(allowed[: logits.shape[-1]], logits, -mx.inf)


def apply_bitmask(logits: mx.array, words: np.ndarray) -> mx.array:
    """`logits[..., vocab]` with the tokens whose bit is 0 in `words` (int32) set to -inf."""
    if logits.shape[-1] > 32 * words.shape[-1]:
        raise ValueError(f"logits have {logits.shape[-1]} entries, the mask covers {32 * words.shape[-1]}")
    return _masked(logits, mx.array(words.view(np.uint32)))


# --------------------------------------------------------------------------- the constraint


class JsonSchemaConstraint:
    """The answer's schema and the function tools' parameter schemas, compiled once.

    Either part may be absent: with only tools, tool arguments are constrained and the answer
    is free. Call `processor()` for each generation.
    """

    def __init__(self, tokenizer: HarmonyTokenizer, schema: Any = None,
                 tools: Iterable[ToolDescription] = (), *, name: str | None = None,
                 description: str | None = None):
        self.tokenizer = tokenizer
        self.answer = None if schema is None else compile_schema(tokenizer, schema)
        self.response_format = None if schema is None else response_format_of(schema, name, description)
        self.tools = {
            FUNCTIONS + tool.name: compile_schema(tokenizer, tool.parameters or ANY_OBJECT,
                                                  f"parameters of tool {tool.name!r}")
            for tool in tools
        }
        self._any_object: CompiledSchema | None = None

    @classmethod
    def from_schema(cls, tokenizer: HarmonyTokenizer, schema: Any = None, *,
                    tools: Iterable[ToolDescription] = (), name: str | None = None,
                    description: str | None = None) -> "JsonSchemaConstraint":
        """The one-call entry point: `constraint.processor()` goes to the generation loop's
        `logits_processors`, `constraint.response_format` into the developer message."""
        return cls(tokenizer, schema, tools, name=name, description=description)

    def processor(self, prompt: Sequence[int] = ()) -> "ConstrainedLogitsProcessor":
        """A fresh logits processor for one generation from `prompt` (see the class)."""
        return ConstrainedLogitsProcessor(self, prompt)

    def schema_for(self, channel: str | None, recipient: str | None,
                   content_type: str | None) -> tuple[CompiledSchema, int] | None:
        """The schema that constrains an assistant message with this header, and its end token."""
        if recipient is None:
            if channel == "final" and self.answer is not None:
                return self.answer, self.tokenizer.return_
            return None
        if recipient.startswith(FUNCTIONS) and "json" in (content_type or ""):
            compiled = self.tools.get(recipient)
            if compiled is None:  # a function the developer did not declare: still valid JSON
                if self._any_object is None:
                    self._any_object = compile_schema(self.tokenizer, ANY_OBJECT)
                compiled = self._any_object
            return compiled, self.tokenizer.call
        return None


class ConstrainedLogitsProcessor:
    """One generation's state: a harmony parser and the active message's JSON matcher.

    `tokens` are the ids generated so far (this project's generation loop); one processor can
    serve one generation after another (a chat's rounds). Without `prompt`
    the stream is taken to start inside the assistant's header (a completion prompt ends with
    `<|start|>assistant`), unless the first call's `tokens` start with `<|start|>`: then they
    are read as the prompt (mlx-lm passes prompt + generated ids). With `prompt`, its last
    message is read first, so a prompt that already opened the final message
    (`...<|channel|>final<|message|>`) is constrained from its first sampled token.
    """

    def __init__(self, constraint: JsonSchemaConstraint, prompt: Sequence[int] = ()):
        self.constraint = constraint
        self.tok = constraint.tokenizer
        self.prompt = [int(t) for t in prompt]
        self.words = np.zeros(MASK_WORDS, dtype=np.int32)
        self.reset()

    def reset(self) -> None:
        """Start over (from `prompt`); done by itself when `tokens` come back shorter, i.e. when
        the processor is reused for the next generation."""
        self.parser: StreamParser | None = None
        self.seen = 0
        self.matcher: llguidance.LLMatcher | None = None
        self.end_token = self.tok.return_
        if self.prompt:
            self._read_prompt(self.prompt)

    @property
    def active(self) -> bool:
        """Whether the next token is constrained."""
        return self.matcher is not None

    def __call__(self, tokens: Sequence[int] | mx.array, logits: mx.array) -> mx.array:
        self.advance(tokens)
        if self.matcher is None:
            return logits
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        if self.matcher.is_error():  # e.g. a parser resource limit: never sample from no mask
            raise SchemaError(f"the JSON Schema constraint failed: {self.matcher.get_error()}")
        if self.end_token != self.tok.return_:
            self._swap_end_token()
        return apply_bitmask(logits, self.words)

    def advance(self, tokens: Sequence[int] | mx.array) -> None:
        """Read the tokens not seen yet."""
        if len(tokens) < self.seen:
            self.reset()
        new = tokens[self.seen:]
        new = new.tolist() if isinstance(new, mx.array) else [int(t) for t in new]
        self.seen += len(new)
        if self.parser is None and new and new[0] == self.tok.start:
            self._read_prompt(new)
            return
        if self.parser is None:
            self.parser = StreamParser(self.tok, Role.ASSISTANT)
        for token in new:
            self._feed(token)

    def _read_prompt(self, prompt: list[int]) -> None:
        """Only the last message of a prompt can still be open: read from its `<|start|>`."""
        if self.tok.start in prompt:
            prompt = prompt[len(prompt) - 1 - prompt[::-1].index(self.tok.start):]
            self.parser = StreamParser(self.tok, None)
        else:
            self.parser = StreamParser(self.tok, Role.ASSISTANT)
        for token in prompt:
            self._feed(token)

    def _feed(self, token: int) -> None:
        was_content = self.parser.state is State.CONTENT
        if self.matcher is not None and token != self.end_token:
            if not self.matcher.consume_token(token):
                raise SchemaError(
                    f"token {token} ({self.tok.decode([token])!r}) breaks the JSON Schema constraint; "
                    f"was it sampled from unmasked logits? ({self.matcher.get_error()})")
        self.parser.feed(token)
        if self.parser.state is not State.CONTENT:
            self.matcher = None
        elif not was_content:  # a header just closed: the message's content starts here
            self._open(self.parser)

    def _open(self, parser: StreamParser) -> None:
        self.matcher = None
        if parser.current_role is not Role.ASSISTANT:
            return
        found = self.constraint.schema_for(parser.current_channel, parser.current_recipient,
                                           parser.current_content_type)
        if found is not None:
            compiled, self.end_token = found
            self.matcher = compiled.matcher()

    def _swap_end_token(self) -> None:
        """The matcher ends with its EOS (`<|return|>`); a tool call must end with `<|call|>`."""
        words = self.words.view(np.uint32)
        ret, call = self.tok.return_, self.end_token
        if words[ret // 32] >> np.uint32(ret % 32) & np.uint32(1):
            words[ret // 32] &= ~np.uint32(1 << (ret % 32))
            words[call // 32] |= np.uint32(1 << (call % 32))


# --------------------------------------------------------------------------- cost


def constraint_cost(tokenizer: HarmonyTokenizer, schema: Any, document: str,
                    repeats: int = 3) -> dict[str, float]:
    """What the constraint adds to each decoded token, replaying `document` (valid for `schema`)
    as a final answer: parser bookkeeping, llguidance's mask and the MLX masking, evaluated.

    Milliseconds per token over all repeats: mean, median, 90th percentile and max.
    """
    constraint = JsonSchemaConstraint(tokenizer, schema)
    answer = tokenizer.encode(document) + [tokenizer.return_]
    header = [tokenizer.channel] + tokenizer.encode("final") + [tokenizer.message]
    logits = mx.random.normal((VOCAB_SIZE,))
    mx.eval(logits)
    times = []
    for repeat in range(repeats + 1):  # the first replay warms up (compiles the masking)
        processor = constraint.processor()
        generated = list(header)
        for token in answer:
            start = time.perf_counter()
            mx.eval(processor(generated, logits))
            if repeat:
                times.append(time.perf_counter() - start)
            generated.append(token)
    ms = np.array(times) * 1e3
    return {"tokens": len(answer), "mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90)), "max_ms": float(ms.max())}
