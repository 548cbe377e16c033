"""Structured output: JSON that validates against a schema by construction, not by hope.

A `JsonSchemaConstraint` compiles the answer's schema (and each function tool's parameter
schema) once, before generation, so a bad schema fails early with `SchemaError`. Its
`processor()` is a logits processor `(tokens so far, logits) -> logits` for one generation.
With a response format, a `tool_choice` or a reasoning budget it writes the whole assistant
turn: headers only from the allowed openings (analysis, final, `functions.NAME` calls), one
free analysis closed by `<|end|>` when the budget (or the room left in `max_tokens` for the
longest valid answer) runs out, then the final message's JSON and `<|return|>`, or a call's
arguments and `<|call|>`. A model that never writes a header still answers valid JSON: that
is the guarantee, not "usually". With only tools it constrains the JSON bodies the model
opens. It reads the harmony state from the generation loop's parser (`bind`), so each
sequence is parsed once; see docs/structured-output.md.

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
add keys; without `maxLength` a string may run on), so for an unbounded schema a confused model
can still reach `max_tokens` before the JSON closes: `json_complete` is then False and the
result says `stop == "length"`. Cost per decoded token on the 2-core CPU (`constraint_cost`,
`benchmarks/constrained_cost.py`, medians of two runs): 0.15-0.18 ms for a header token or
analysis text (one masking pass over the vocabulary), 0.25-0.5 ms for a JSON token
(llguidance's mask + the bitmask expanded in MLX).
"""
from __future__ import annotations

import functools
import json
import math
import re._parser as _regex_parser
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
from .harmony.parser import MAX_HEADER_TOKENS, State, StreamParser, parser_after
from .harmony.tokenizer import FIRST_SPECIAL_ID, VOCAB_SIZE, HarmonyTokenizer

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

# Built from data, not as a lazy graph: MLX evaluates a lazy array only on the stream (thread)
# that made it, and masks are computed in whichever thread runs the generation (the engine's).
_BIT_SHIFTS = mx.array(np.arange(32, dtype=np.uint32))


@mx.compile
def _expanded(words: mx.array) -> mx.array:
    return ((words[:, None] >> _BIT_SHIFTS) & 1).reshape(-1).astype(mx.bool_)


def bitmask_to_mask(words: np.ndarray) -> mx.array:
    """The bool `[32 * words]` mask of llguidance's bitmask (int32 words, bit i = token i)."""
    return _expanded(mx.array(words.view(np.uint32)))


def masked(logits: mx.array, mask: mx.array) -> mx.array:
    """`logits[..., vocab]` with the tokens `mask` does not allow set to -inf."""
    if logits.shape[-1] > mask.shape[-1]:
        raise ValueError(f"logits have {logits.shape[-1]} entries, the mask covers {mask.shape[-1]}")
    return mx.where(mask[..., : logits.shape[-1]], logits, -mx.inf)


def apply_bitmask(logits: mx.array, words: np.ndarray) -> mx.array:
    """`logits[..., vocab]` with the tokens whose bit is 0 in `words` (int32) set to -inf."""
    return masked(logits, bitmask_to_mask(words))


# --------------------------------------------------------------------------- answer lengths

WHITESPACE_MAX = 16  # the most characters WHITESPACE allows in one gap
# The longest way llguidance lets one character of a JSON string be written: 4 bytes of UTF-8,
# or a `\uXXXX` escape (6) for control characters.
BYTES_PER_CHAR = 6


def max_json_tokens(schema: Schema) -> int | None:
    """An upper bound on the tokens of any JSON text the compiled `schema` accepts, or None
    when it is unbounded (a `number`, a string without `maxLength` or anchored `pattern`, an
    array without `maxItems`, an object open to additional properties, recursion).

    It bounds the UTF-8 bytes (every token is at least one byte), counting each whitespace gap
    at its maximum: safe, not tight. It is what lets a reasoning budget leave room for a
    complete answer.
    """
    return _LengthBound(schema).of(schema)


def _largest(bounds: Iterable[int | None]) -> int | None:
    bounds = list(bounds)
    return None if not bounds or None in bounds else max(bounds)


def _value_bytes(value: Any) -> int:
    """A `const`/`enum` value: its JSON text, plus a maximal gap around each item."""
    if isinstance(value, dict):
        inner = sum(len(json.dumps(k, ensure_ascii=False).encode()) + 1 + _value_bytes(v)
                    for k, v in value.items())
        return 2 + inner + max(len(value) - 1, 0) + max(4 * len(value), 1) * WHITESPACE_MAX
    if isinstance(value, list):
        inner = sum(_value_bytes(v) for v in value)
        return 2 + inner + max(len(value) - 1, 0) + max(2 * len(value), 1) * WHITESPACE_MAX
    return len(json.dumps(value, ensure_ascii=False).encode())


class _LengthBound:
    """`max_json_tokens`: each keyword that limits a value gives a bound; the least one holds."""

    def __init__(self, root: Schema):
        self.root = root
        self.resolving: set[str] = set()

    def of(self, schema: Schema) -> int | None:
        if schema is False:
            return 0
        if not isinstance(schema, dict) or "x-guidance" in schema:  # own whitespace rules
            return None
        bounds = []
        if "const" in schema:
            bounds.append(_value_bytes(schema["const"]))
        if "enum" in schema:
            bounds.append(max((_value_bytes(v) for v in schema["enum"]), default=0))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                bounds.append(_largest(self.of(s) for s in schema[key]))
        bounds += [self.of(s) for s in schema.get("allOf", ())]
        if "$ref" in schema:
            bounds.append(self.ref(schema["$ref"]))
        if "type" in schema:
            types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            bounds.append(_largest(self.typed(t, schema) for t in types))
        known = [b for b in bounds if b is not None]
        return min(known) if known else None

    def ref(self, ref: str) -> int | None:
        if ref in self.resolving or not ref.startswith("#"):
            return None  # recursion: no fixed bound
        target: Any = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                return None
            target = target[part]
        self.resolving.add(ref)
        try:
            return self.of(target)
        finally:
            self.resolving.discard(ref)

    def typed(self, kind: str, schema: dict) -> int | None:
        if kind in ("null", "boolean"):
            return len(kind) if kind == "null" else len("false")
        if kind == "integer":
            return self.integer(schema)
        if kind == "string":
            return self.string(schema)
        if kind == "array":
            return self.array(schema)
        if kind == "object":
            return self.object(schema)
        return None  # "number": its fraction has no length limit

    @staticmethod
    def integer(schema: dict) -> int | None:
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        if not isinstance(low, (int, float)) or not isinstance(high, (int, float)):
            return None
        return max(len(str(math.floor(low))), len(str(math.ceil(high))))

    @staticmethod
    def string(schema: dict) -> int | None:
        chars = []
        if isinstance(schema.get("maxLength"), int):
            chars.append(schema["maxLength"])
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and pattern.startswith("^") and pattern.endswith("$"):
            try:
                width = _regex_parser.parse(pattern).getwidth()[1]
            except Exception:  # noqa: BLE001 - llguidance's regex syntax is not Python's
                width = None
            if width is not None and width < _regex_parser.MAXREPEAT:
                chars.append(width)
        if schema.get("format") == "date":
            chars.append(len("YYYY-MM-DD"))
        return 2 + BYTES_PER_CHAR * min(chars) if chars else None

    def array(self, schema: dict) -> int | None:
        most = schema.get("maxItems")
        if not isinstance(most, int) or "prefixItems" in schema:
            return None
        item = self.of(schema.get("items", True)) if most else 0
        if item is None:
            return None
        return 2 + most * item + max(most - 1, 0) + max(2 * most, 1) * WHITESPACE_MAX

    def object(self, schema: dict) -> int | None:
        if schema.get("additionalProperties", True) is not False or "patternProperties" in schema:
            return None
        properties = schema.get("properties", {})
        values = [self.of(s) for s in properties.values()]
        if None in values:
            return None
        keys = sum(len(json.dumps(k, ensure_ascii=False).encode()) + 1 for k in properties)
        count = len(properties)
        return 2 + keys + sum(values) + max(count - 1, 0) + max(4 * count, 1) * WHITESPACE_MAX


# --------------------------------------------------------------------------- the constraint

TOOL_CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class Opening:
    """A message the structured decoder may open once the assistant's role is written.

    `header`: its tokens from `<|channel|>` to `<|message|>`; `schema`: what its body must be
    (None: free text); `body_tokens`: the most tokens the body can take (None: unbounded).
    """

    kind: str  # "analysis", "final" or "call"
    header: tuple[int, ...]
    schema: CompiledSchema | None
    body_tokens: int | None


def tool_choice_of(tool_choice: Any, names: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """("auto" | "none" | "required", the functions a call may go to) from OpenAI's forms:
    "auto", "none", "required", {"type": "function", "name": N} (Responses) or
    {"type": "function", "function": {"name": N}} (Chat Completions), and
    {"type": "allowed_tools", "mode": "auto" | "required", "tools": [...]} (Responses; Chat
    nests mode and tools under "allowed_tools"): calls only to those of the declared
    functions, which all stay in the prompt (so it still matches a cached prefix)."""
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "allowed_tools":
        return allowed_tools_of(tool_choice, names)
    if isinstance(tool_choice, dict):
        named = function_named(tool_choice)
        if tool_choice.get("type") != "function" or not isinstance(named, str):
            raise SchemaError(f"tool_choice {json.dumps(tool_choice)[:200]} is not "
                              '{"type": "function", "name": NAME}')
        if named not in names:
            raise SchemaError(f"tool_choice names the function {named!r}, which is not among the "
                              f"tools ({', '.join(names) or 'none declared'})")
        return "required", (named,)
    if tool_choice not in TOOL_CHOICES:
        raise SchemaError(f"tool_choice must be auto, none, required, a named function or "
                          f"allowed_tools, got {tool_choice!r}")
    if tool_choice == "required" and not names:
        raise SchemaError('tool_choice "required" needs at least one function tool')
    return tool_choice, tuple(names) if tool_choice != "none" else ()


def function_named(entry: dict) -> Any:
    """The function a tool_choice entry names: {"name": N} (Responses) or {"function":
    {"name": N}} (Chat Completions); None if neither."""
    return entry.get("name") or (entry.get("function") or {}).get("name")


def allowed_tools_of(choice: dict, names: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """`tool_choice_of` for {"type": "allowed_tools", ...}. Entries of other kinds than
    "function" (built-in tools) do not restrict the function calls."""
    spec = choice.get("allowed_tools", choice)  # Chat Completions nests the two fields
    mode, tools = (spec.get("mode"), spec.get("tools")) if isinstance(spec, dict) else (None, None)
    if mode not in ("auto", "required") or not isinstance(tools, list):
        raise SchemaError('allowed_tools needs "mode" ("auto" or "required") and a "tools" list')
    allowed: list[str] = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        named = function_named(tool)
        if named not in names:
            raise SchemaError(f"allowed_tools names the function {named!r}, which is not among "
                              f"the tools ({', '.join(names) or 'none declared'})")
        if named not in allowed:
            allowed.append(named)
    if mode == "required" and not allowed:
        raise SchemaError('allowed_tools with mode "required" needs at least one function')
    return mode, tuple(allowed)


class JsonSchemaConstraint:
    """The answer's schema, the function tools' parameter schemas and the message structure
    they allow, compiled once; call `processor()` for each generation (each row of a batch).

    Structured (the default whenever a response format, a `tool_choice` other than "auto" or
    a `max_reasoning_tokens` is given): the decoder writes the whole assistant turn. Headers
    can only be `<|channel|>analysis<|message|>`, `<|channel|>final<|message|>` or
    `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>` (one per function
    the tool choice allows); at most one analysis message, free text closed by `<|end|>`
    (forced when the reasoning budget is spent), then the answer: the final message (the
    schema's JSON, or free text without one) ending `<|return|>`, or a call whose arguments
    match the function's parameters, ending `<|call|>`. Otherwise (only tools, "auto") the
    model writes its own headers and only JSON bodies it opens are constrained
    (`structure=False` forces that mode: the model is trusted to open `final` itself).
    """

    def __init__(self, tokenizer: HarmonyTokenizer, schema: Any = None,
                 tools: Iterable[ToolDescription] = (), *, tool_choice: Any = "auto",
                 max_reasoning_tokens: int | None = None, structure: bool = True,
                 name: str | None = None, description: str | None = None):
        self.tokenizer = tokenizer
        self.answer = None if schema is None else compile_schema(tokenizer, schema)
        self.response_format = None if schema is None else response_format_of(schema, name, description)
        tools = list(tools)
        self.tools = {
            FUNCTIONS + tool.name: compile_schema(tokenizer, tool.parameters or ANY_OBJECT,
                                                  f"parameters of tool {tool.name!r}")
            for tool in tools
        }
        self.tool_choice, callable_ = tool_choice_of(tool_choice, [t.name for t in tools])
        # "auto" over a subset of the functions (allowed_tools) needs the structure too.
        self.restricted = set(callable_) != {t.name for t in tools}
        if max_reasoning_tokens is not None and (
                type(max_reasoning_tokens) is not int or max_reasoning_tokens < 0):
            raise SchemaError(f"max_reasoning_tokens must be a whole number >= 0, "
                              f"got {max_reasoning_tokens!r}")
        self.max_reasoning_tokens = max_reasoning_tokens
        wanted = (schema is not None or self.tool_choice != "auto" or self.restricted
                  or max_reasoning_tokens is not None)
        if not structure and (self.tool_choice != "auto" or self.restricted
                              or max_reasoning_tokens is not None):
            raise SchemaError("tool_choice and max_reasoning_tokens need structure=True")
        self.structured = structure and wanted
        self._any_object: CompiledSchema | None = None
        self._masks: dict[frozenset[int], mx.array] = {}
        tok = tokenizer
        self.role = tuple(tok.encode(Role.ASSISTANT.value))
        # After the analysis content: <|end|><|start|>assistant, then the answer's header.
        self.reopen_tokens = 2 + len(self.role)
        self.openings = self._openings(callable_)
        self._text = np.arange(VOCAB_SIZE) < FIRST_SPECIAL_ID

    @classmethod
    def from_schema(cls, tokenizer: HarmonyTokenizer, schema: Any = None, *,
                    tools: Iterable[ToolDescription] = (), tool_choice: Any = "auto",
                    max_reasoning_tokens: int | None = None, structure: bool = True,
                    name: str | None = None, description: str | None = None) -> "JsonSchemaConstraint":
        """The one-call entry point: `constraint.processor(prompt, max_tokens=...)` goes to the
        generation loop's `logits_processors` (bound to its parser), `constraint.response_format`
        into the developer message."""
        return cls(tokenizer, schema, tools, tool_choice=tool_choice,
                   max_reasoning_tokens=max_reasoning_tokens, structure=structure, name=name,
                   description=description)

    def processor(self, prompt: Sequence[int] = (), *,
                  max_tokens: int | None = None) -> "ConstrainedLogitsProcessor":
        """A fresh logits processor for one generation from `prompt` (see the class);
        `max_tokens`, the generation's limit, lets the reasoning budget keep room for the answer."""
        return ConstrainedLogitsProcessor(self, prompt, max_tokens)

    def _openings(self, callable_: Sequence[str]) -> list[Opening]:
        tok = self.tokenizer

        def header(text: str, *extra: int) -> tuple[int, ...]:
            return (tok.channel, *tok.encode(text), *extra, tok.message)

        openings = [Opening("analysis", header("analysis"), None, None)]
        if self.tool_choice != "required":
            bound = None if self.answer is None else max_json_tokens(self.answer.schema)
            openings.append(Opening("final", header("final"), self.answer, bound))
        for name in callable_:
            compiled = self.tools[FUNCTIONS + name]
            call = header(f"commentary to={FUNCTIONS}{name} ", tok.constrain, *tok.encode("json"))
            if len(call) + len(self.role) > MAX_HEADER_TOKENS:
                raise SchemaError(f"tool name {name!r} is too long for a harmony header")
            openings.append(Opening("call", call, compiled, max_json_tokens(compiled.schema)))
        return openings

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

    def only(self, tokens: Iterable[int]) -> mx.array:
        """The allowed-token mask (bool `[vocab]`) for a handful of tokens, cached: headers."""
        key = frozenset(tokens)
        mask = self._masks.get(key)
        if mask is None:
            allowed = np.zeros(VOCAB_SIZE, dtype=bool)
            allowed[list(key)] = True
            mask = self._masks[key] = mx.array(allowed)
        return mask

    def text_and(self, token: int) -> mx.array:
        """Any ordinary text token, or `token` (which closes the free-text message), cached."""
        key = frozenset((-1, token))  # -1 stands for "all text"
        mask = self._masks.get(key)
        if mask is None:
            allowed = self._text.copy()
            allowed[token] = True
            mask = self._masks[key] = mx.array(allowed)
        return mask


class ConstrainedLogitsProcessor:
    """One generation's constraint state; bound to the loop's `StreamParser` (`bind`), it reads
    that parser's state instead of parsing the tokens again.

    `processor(tokens, logits) -> logits` runs before each sampled token. Bound, the parser
    must already have read every generated token (the loop feeds it, then calls processors),
    and `tokens` is not read. Unbound (mlx-lm, or `generate_tokens` directly) the processor
    keeps its own parser, fed from `tokens`: without `prompt` the stream is taken to start
    inside the assistant's header (a completion prompt ends with `<|start|>assistant`),
    unless the first call's `tokens` start with `<|start|>` (mlx-lm passes prompt + generated
    ids); with `prompt`, its last message is read first (`parser_after`), so a prompt that
    already opened the final message is constrained from its first sampled token. Unbound,
    one processor serves generation after generation (`tokens` coming back shorter resets it).

    Holds no global state: one per row of a batch. `json_complete` says whether the JSON
    message it constrained was finished.
    """

    def __init__(self, constraint: JsonSchemaConstraint, prompt: Sequence[int] = (),
                 max_tokens: int | None = None):
        self.constraint = constraint
        self.tok = constraint.tokenizer
        self.prompt = [int(t) for t in prompt]
        self.max_tokens = max_tokens
        self.words = np.zeros(MASK_WORDS, dtype=np.int32)
        self.bound: StreamParser | None = None
        self.reset()

    def bind(self, parser: StreamParser) -> None:
        """Use the generation loop's parser for this sequence (called once, before the first
        step; the parser must start where generation starts, e.g. `parser_after(prompt)`)."""
        self.bound = parser
        self._start(parser)

    def reset(self) -> None:
        """Start over (from `prompt`); done by itself when `tokens` come back shorter, i.e. when
        the unbound processor is reused for the next generation."""
        self.seen = 0
        self._start(self.bound if self.bound is not None else parser_after(self.prompt, self.tok))

    def _start(self, parser: StreamParser) -> None:
        self.parser = parser
        self.base = len(parser.tokens)  # read before generation: the prompt's open message
        self.first_message = len(parser.messages)
        self.message: int | None = None  # index (in parser.messages) of the followed message
        self.newest = len(parser.messages) - 1  # the newest message index followed so far
        self.kind: str | None = None  # its kind: "analysis", "final", "call" or None
        self.matcher: llguidance.LLMatcher | None = None
        self.end_token = self.tok.return_
        self.consumed = 0  # parser.tokens[:consumed] went to the matcher
        self.completed: bool | None = None
        self._sync()

    @property
    def active(self) -> bool:
        """Whether the next token is constrained by a JSON schema."""
        return self.matcher is not None

    @property
    def json_complete(self) -> bool | None:
        """Whether the last JSON message (the answer, or a call's arguments) was finished:
        True once its end token is sampled (or nothing but it can follow), False when the
        generation stopped inside it, None when none was opened. For `stop == "length"`:
        True means the text is still complete, schema-valid JSON."""
        if self.bound is not None:
            self._sync()
        return self.completed if self.matcher is None else self._only_end_left()

    def __call__(self, tokens: Sequence[int] | mx.array, logits: mx.array) -> mx.array:
        mask = self.next_mask(tokens)
        return logits if mask is None else masked(logits, mask)

    def next_mask(self, tokens: Sequence[int] | mx.array = ()) -> mx.array | None:
        """The next token's allowed-token mask (bool `[vocab]`), or None when it is free.

        It depends only on the tokens so far, never on the logits: a batched engine can stack
        the rows' masks into one `mx.where`, and a pipelined loop can compute it while the
        model's forward pass for the last token runs."""
        if self.bound is None:
            self.advance(tokens)
        else:
            self._sync()
        if self.matcher is not None:
            return self._json_mask()
        if not self.constraint.structured:
            return None
        return self._structure_mask()

    # ----------------------------------------------------------------- following the stream

    def advance(self, tokens: Sequence[int] | mx.array) -> None:
        """Unbound: feed the tokens not seen yet to the processor's own parser."""
        if len(tokens) < self.seen:
            self.reset()
        new = tokens[self.seen:]
        new = new.tolist() if isinstance(new, mx.array) else [int(t) for t in new]
        if not self.seen and not self.prompt and new and new[0] == self.tok.start:
            self.seen = len(new)  # mlx-lm: the prompt comes with the generated ids
            self._start(parser_after(new, self.tok))
            return
        self.seen += len(new)
        for token in new:
            self.parser.feed(token)
            self._sync()

    def _sync(self) -> None:
        """Catch up with the parser: close the tracked message if it ended, open the newest
        one if it is new, feed the open JSON body's new tokens to the matcher. Tokens normally
        come one at a time; after several, only the newest message is followed."""
        p = self.parser
        open_index = len(p.messages) if p.state is State.CONTENT else None
        if self.message is not None and self.message != open_index:
            last_closed = open_index is None and self.message == len(p.messages) - 1
            self._finish(p, p.content_stop if last_closed else None)
        newest = len(p.messages) if open_index is not None else len(p.messages) - 1
        if newest > self.newest:
            self._open(p, newest, is_open=open_index is not None)
        if self.matcher is not None:
            self._consume(p.tokens[self.consumed:])

    def _open(self, p: StreamParser, index: int, is_open: bool) -> None:
        """Follow message `index`: the open one, or (catching up) one that already closed."""
        self.newest = index
        self.message = index
        header = p.header if is_open else p.messages[index]
        role = header.author.role
        self.kind = None
        if role is Role.ASSISTANT:
            self.kind = "call" if header.recipient else (
                header.channel if header.channel in ("analysis", "final") else None)
        found = None if role is not Role.ASSISTANT else self.constraint.schema_for(
            header.channel, header.recipient, header.content_type)
        if found is None:
            self.matcher = None
        else:
            compiled, self.end_token = found
            self.matcher = compiled.matcher()
            self.consumed = p.content_start
            self.completed = False
        if not is_open:
            self._finish(p, p.content_stop)

    def _finish(self, p: StreamParser, stop: int | None) -> None:
        """The followed message closed at `p.tokens[stop]` (None: where is no longer known)."""
        if self.matcher is not None:
            if stop is None:
                self.completed = False
            else:
                self._consume(p.tokens[self.consumed:stop])
                ended = stop < len(p.tokens) and p.tokens[stop] == self.end_token
                self.completed = (ended and self.matcher.is_accepting()) or self._only_end_left()
        self.matcher = None
        self.message = self.kind = None

    def _consume(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            if not self.matcher.consume_token(token):
                raise SchemaError(
                    f"token {token} ({self.tok.decode([token])!r}) breaks the JSON Schema "
                    f"constraint; was it sampled from unmasked logits? ({self.matcher.get_error()})")
        self.consumed += len(tokens)

    # ----------------------------------------------------------------- masks

    def _json_mask(self) -> mx.array:
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        if self.matcher.is_error():  # e.g. a parser resource limit: never sample from no mask
            raise SchemaError(f"the JSON Schema constraint failed: {self.matcher.get_error()}")
        if self.end_token != self.tok.return_:
            self._swap_end_token()
        return bitmask_to_mask(self.words)

    def _only_end_left(self) -> bool:
        """The JSON is complete and cannot go on (only the end token may follow)."""
        if self.matcher is None or not self.matcher.is_accepting():
            return False
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        words = self.words.view(np.uint32)
        ret = self.tok.return_
        return int(np.count_nonzero(words)) == 1 and int(words[ret // 32]) == 1 << (ret % 32)

    def _swap_end_token(self) -> None:
        """The matcher ends with its EOS (`<|return|>`); a tool call must end with `<|call|>`."""
        words = self.words.view(np.uint32)
        ret, call = self.tok.return_, self.end_token
        if words[ret // 32] >> np.uint32(ret % 32) & np.uint32(1):
            words[ret // 32] &= ~np.uint32(1 << (ret % 32))
            words[call // 32] |= np.uint32(1 << (call % 32))

    def _structure_mask(self) -> mx.array:
        """The allowed tokens outside JSON bodies: a header, or free analysis/final text."""
        c, p, tok = self.constraint, self.parser, self.tok
        if p.state is State.EXPECT_START:
            return c.only((tok.start,))
        if p.state is State.HEADER:
            return c.only(self._header_choices(p))
        if self.kind == "analysis":
            return c.text_and(tok.end) if self._may_think(p) else c.only((tok.end,))
        if self.kind == "final":
            return c.text_and(tok.return_)
        raise SchemaError(f"the assistant opened a message the constraint does not allow "
                          f"(channel {p.current_channel!r}, recipient {p.current_recipient!r})")

    def _header_choices(self, p: StreamParser) -> set[int]:
        """The next header token: the role after `<|start|>`, then one of the openings."""
        written = list(p.header_tokens)
        role = self.constraint.role
        if p.next_role is None:
            if written[:len(role)] != list(role)[:len(written)]:
                raise SchemaError(f"the header {self.tok.decode(written)!r} is not the assistant's")
            if len(written) < len(role):
                return {role[len(written)]}
            written = written[len(role):]
        n = len(written)
        choices = {o.header[n] for o in self._openings_now(n)
                   if len(o.header) > n and list(o.header[:n]) == written}
        if not choices:
            raise SchemaError(f"the header {self.tok.decode(written)!r} is not one the constraint "
                              f"allows (tool_choice {self.constraint.tool_choice!r})")
        return choices

    # ----------------------------------------------------------------- the reasoning budget

    def _remaining(self) -> float:
        """Tokens left to sample, this one included."""
        if self.max_tokens is None:
            return math.inf
        return self.max_tokens - (len(self.parser.tokens) - self.base)

    def _answer_tokens(self, opening: Opening, written: int = 0, planning: bool = True) -> float:
        """Tokens an answer takes from its header's `written`-th token to its end token; an
        unbounded body is planned at half of `max_tokens` (or one token, to merely start)."""
        body = opening.body_tokens
        if body is None:
            body = (self.max_tokens or 0) // 2 if planning else 1
        return len(opening.header) - written + body + 1

    def _answers_need(self) -> float:
        """What the cheapest answer needs after the analysis content: `<|end|><|start|>assistant`
        and the answer itself."""
        answers = [o for o in self.constraint.openings if o.kind != "analysis"]
        return self.constraint.reopen_tokens + min(self._answer_tokens(o) for o in answers)

    def _openings_now(self, written: int) -> list[Opening]:
        """The openings allowed at this point: answers that still fit in `max_tokens` (all of
        them if none does), and the analysis if the budget and `max_tokens` leave room."""
        remaining = self._remaining()
        answers = [o for o in self.constraint.openings if o.kind != "analysis"]
        fitting = [o for o in answers if remaining >= self._answer_tokens(o, written, planning=False)]
        allowed = fitting or answers
        analysis = self.constraint.openings[0]
        thought = any(m.channel == "analysis" for m in self.parser.messages[self.first_message:])
        budget = self.constraint.max_reasoning_tokens
        if (not thought and budget != 0
                and remaining >= len(analysis.header) - written + self._answers_need()):
            allowed = [analysis, *allowed]
        return allowed

    def _may_think(self, p: StreamParser) -> bool:
        """Whether the analysis may take one more text token."""
        budget = self.constraint.max_reasoning_tokens
        if budget is not None and len(p.tokens) - p.content_start >= budget:
            return False
        return self._remaining() - 1 >= self._answers_need()


# --------------------------------------------------------------------------- cost


def _summary(times: list[float]) -> dict[str, float]:
    ms = np.array(times) * 1e3
    return {"mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90)), "max_ms": float(ms.max())}


def constraint_cost(tokenizer: HarmonyTokenizer, schema: Any, document: str, repeats: int = 3,
                    reasoning: str = "The user wants the order; I will fill in the fields.",
                    ) -> dict[str, Any]:
    """What the constraint adds to each decoded token, replaying a whole structured turn as the
    engine runs it (one parser, fed each token, the processor bound to it): the analysis
    header, `reasoning`, `<|end|><|start|>assistant`, the final header, then `document` (valid
    for `schema`) and `<|return|>`. The parser's own work is the loop's, not timed here.

    Milliseconds per token over all repeats, for the answer (mean, median, p90, max; `tokens`:
    its length with `<|return|>`) and per phase in `phases`: "header" (forced header tokens),
    "analysis" (free text, the text mask) and "answer" (llguidance's mask and the MLX masking).
    """
    tok = tokenizer
    constraint = JsonSchemaConstraint(tokenizer, schema)
    analysis, final = constraint.openings[:2]
    turn = ([(t, "header") for t in analysis.header] + [(t, "analysis") for t in tok.encode(reasoning)]
            + [(tok.end, "analysis")]
            + [(t, "header") for t in (tok.start, *constraint.role, *final.header)]
            + [(t, "answer") for t in tok.encode(document) + [tok.return_]])
    logits = mx.random.normal((VOCAB_SIZE,))
    mx.eval(logits)
    times: dict[str, list[float]] = {"header": [], "analysis": [], "answer": []}
    for repeat in range(repeats + 1):  # the first replay warms up (compiles the masking)
        parser = StreamParser(tok, Role.ASSISTANT)
        processor = constraint.processor()
        processor.bind(parser)
        for token, phase in turn:
            start = time.perf_counter()
            mx.eval(processor((), logits))
            if repeat:
                times[phase].append(time.perf_counter() - start)
            parser.feed(token)
    if not processor.json_complete:
        raise SchemaError("the document does not complete the schema's JSON")
    return {"tokens": len(tok.encode(document)) + 1, **_summary(times["answer"]),
            "phases": {phase: {"tokens": len(t) // repeats, **_summary(t)} for phase, t in times.items()}}
