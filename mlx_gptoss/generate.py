"""The generation loop: prefill, decode, stop, stream harmony events, measure.

`generate_tokens` is the token loop (prompt ids in, sampled ids out); `stream_generate` wraps it
with harmony: it renders the prompt, feeds every sampled token to a `StreamParser` and yields
the parser's events, then one `GenerationResult` with the messages and the statistics.
`generate` runs the stream to the end and returns that result.

Logits processors (the structured-output hook): each is called at every step as
`processor(tokens, logits) -> logits`, with the ids generated so far in this call and the
float32 logits `[vocab]` of the next token, before sampling; they run in order. A processor that
needs the harmony state (e.g. to constrain only the `final` channel) defines
`bind(parser: StreamParser)`, called once before the first step; the parser is then always
up to date with `tokens` when the processor runs (`parser.current_channel`,
`parser.current_recipient`, `parser.current_content_type`, `parser.state`, `parser.current_text`).

Stopping: on `<|return|>`, `<|call|>` and `<|endoftext|>` (the checkpoints' eos ids) or after
`max_tokens`. The stop token is yielded but never run through the model, so a `PromptCache`
holds exactly the prompt and the generated text before it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import mlx.core as mx

from .cache import PromptCache
from .defaults import DEFAULT_MAX_TOKENS
from .errors import GptOssError
from .harmony import (
    AnswerDone,
    Event,
    HarmonyTokenizer,
    Message,
    MessageEnd,
    MessageStart,
    Recovery,
    RenderConversationConfig,
    Role,
    StreamParser,
    TextDelta,
    ToolCall,
)
from .harmony.constants import (
    ANALYSIS,
    FINAL,
    STOP_CALL,
    STOP_ENDOFTEXT,
    STOP_LENGTH,
    STOP_RETURN,
)
from .model import PREFILL_CHUNK, Model, prefill
from .prompts import Prompt, render_prompt
from .sampling import SamplingParams, make_sampler

LogitsProcessor = Callable[[list, mx.array], mx.array]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the prompt cache, not recomputed
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_time: float = 0.0
    peak_memory: int = 0  # bytes, mx.get_peak_memory() over this call

    @property
    def prompt_tps(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prompt_time if self.prompt_time > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_time if self.generation_time > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "prompt_tps": round(self.prompt_tps, 3),
                "generation_tokens": self.generation_tokens,
                "generation_tps": round(self.generation_tps, 3),
                "peak_memory_gb": round(self.peak_memory / 1e9, 3)}

    def summary(self) -> str:
        return (f"prompt: {self.prompt_tokens} tokens ({self.cached_tokens} cached), "
                f"{self.prompt_tps:.1f} tok/s | generation: {self.generation_tokens} tokens, "
                f"{self.generation_tps:.1f} tok/s | peak memory: {self.peak_memory / 1e9:.2f} GB")


@dataclass(frozen=True)
class GenerationResult:
    """The last event of `stream_generate`, and what `generate` returns.

    `stop`: "return" (answer done), "call" (a tool must run), "eos", or "length" (max_tokens).
    """

    tokens: list[int]
    messages: list[Message]
    stop: str
    stats: GenerationStats
    prompt_tokens: list[int] = field(repr=False, default_factory=list)
    # False when max_tokens cut off what a constraint guarantees (the response format's JSON, a
    # required call): then `text` is not the answer, and the CLI and server say so.
    complete: bool = True

    @property
    def text(self) -> str:
        """The final answer (the `final` channel), or "" when there is none."""
        return "".join(m.text() for m in self.messages if m.channel == FINAL)

    @property
    def reasoning(self) -> str:
        return "".join(m.text() for m in self.messages if m.channel == ANALYSIS)

    @property
    def tool_calls(self) -> list[Message]:
        return [m for m in self.messages if m.recipient is not None and m.author.role is Role.ASSISTANT]


# --------------------------------------------------------------------------- the token loop


def check_max_tokens(max_tokens: int) -> None:
    if max_tokens < 1:
        raise GptOssError(f"max_tokens must be at least 1, got {max_tokens}")


def check_prompt_ids(model: Model, prompt: Sequence[int]) -> None:
    """An out-of-range id would index past the embedding table: refuse it first."""
    vocab = model.config.vocab_size
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise GptOssError(f"prompt token id {bad} is outside the model's vocabulary (0..{vocab - 1})")


def generate_tokens(model: Model, prompt: Sequence[int], *, sampler: Callable[[mx.array], mx.array],
                    max_tokens: int = DEFAULT_MAX_TOKENS, stop_tokens: Iterable[int] = (),
                    logits_processors: Sequence[LogitsProcessor] = (),
                    prompt_cache: PromptCache | None = None, stats: GenerationStats | None = None,
                    prefill_chunk: int = PREFILL_CHUNK,
                    kv_bits: int | None = None) -> Iterator[int]:
    """Yield sampled token ids, the stop token included, until a stop token or `max_tokens`.

    The next step's forward pass is queued before the current token is read (`mx.async_eval`),
    with or without logits processors (they only mask the next token's logits, after the
    consumer has seen this one), so the device never waits for Python; the one step computed
    past a stop token is rolled back. An exception (Ctrl-C) or closing the generator leaves `prompt_cache`
    consistent with its tokens.
    """
    check_max_tokens(max_tokens)
    check_prompt_ids(model, prompt)
    cache = (prompt_cache if prompt_cache is not None
             else PromptCache.for_model(model, kv_bits=kv_bits))
    stats = stats if stats is not None else GenerationStats()
    stop = set(stop_tokens)
    processors = list(logits_processors)
    generated: list[int] = []

    def choose(logits: mx.array) -> mx.array:
        logits = logits[0]
        if processors:
            logits = logits.astype(mx.float32)
            for processor in processors:
                logits = processor(generated, logits)
        return sampler(logits)

    def feed(token: mx.array) -> mx.array:
        return model(token.reshape(1, 1), cache=cache.layers)[:, -1, :]

    todo = cache.prepare(prompt)
    safe = cache.checkpoint()
    try:
        stats.prompt_tokens = len(prompt)
        stats.cached_tokens = len(prompt) - len(todo)
        mx.reset_peak_memory()
        start = time.perf_counter()
        if todo:
            logits = prefill(model, mx.array([todo]), cache.layers, chunk_size=prefill_chunk)
            cache.advance(todo)
            cache.mark(logits)
        else:  # the same prompt again: its logits were kept
            logits = cache.logits
        safe = cache.checkpoint()
        y = choose(logits)
        mx.async_eval(y)
        prompt_done = time.perf_counter()
        stats.prompt_time = prompt_done - start
        while True:
            queued = None
            if len(generated) + 1 < max_tokens:
                # The next step's forward pass is queued before this token is read. Without
                # processors its sampling is queued too; with them, the forward runs while
                # the consumer (the parser a processor reads) takes `token`, and the
                # processors mask its logits afterwards.
                queued = feed(y)
                if not processors:
                    queued = choose(queued)
                mx.async_eval(queued)
            token = int(y.item())
            generated.append(token)
            stats.generation_tokens = len(generated)
            stats.generation_time = time.perf_counter() - prompt_done
            stats.peak_memory = mx.get_peak_memory()
            if token in stop or len(generated) >= max_tokens:
                cache.rollback(safe)  # drop the step computed past the end
                yield token
                return
            cache.advance([token])  # already fed: the cache holds `token`
            safe = cache.checkpoint()
            yield token
            y = choose(queued) if processors else queued
    except BaseException:
        cache.rollback(safe)
        raise


# --------------------------------------------------------------------------- streaming


@dataclass
class HarmonyRequest:
    """One generation, ready to run: its prompt ids, sampler settings, logits processors and
    the harmony parser its tokens feed (the one parser of this sequence: constraints read it).
    Built by `prepare_request`, run by `stream_generate` or an `Engine`."""

    ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    processors: list[LogitsProcessor]
    parser: StreamParser
    stop_tokens: frozenset[int]

    def result(self, tokens: list[int], stats: "GenerationStats") -> tuple[list[Event], "GenerationResult"]:
        """The closing events (a truncated message's end) and the `GenerationResult`."""
        tok = self.parser.tok
        last = tokens[-1] if tokens else None
        events: list[Event] = []
        if last == tok.return_:
            stop = STOP_RETURN
        elif last == tok.call:
            stop = STOP_CALL
        elif last == tok.endoftext:
            stop = STOP_ENDOFTEXT
        else:
            stop = STOP_LENGTH
            events = list(self.parser.finish())
        return events, GenerationResult(tokens, list(self.parser.messages), stop, stats, self.ids,
                                        complete=answer_complete(self.processors, stop))


def answer_complete(processors: Sequence[LogitsProcessor], stop: str) -> bool:
    """Whether the constrained part of a generation is whole: only `max_tokens` can cut it,
    inside a JSON message, or before an answer the constraint requires was written."""
    if stop != STOP_LENGTH:
        return True
    for processor in processors:
        done = getattr(processor, "json_complete", None)
        constraint = getattr(processor, "constraint", None)
        if done is False:
            return False
        if done is None and constraint is not None and (
                constraint.answer is not None or constraint.tool_choice != "auto"):
            return False
    return True


def sampling_for(model: Model, sampling: SamplingParams | None, **overrides) -> SamplingParams:
    """`sampling`, else the model's generation config (when `load` read one), else
    temperature 1.0 / top-p 1.0; then the keyword overrides that are not None."""
    if sampling is None:
        sampling = getattr(model, "sampling_defaults", None) or SamplingParams()
    return sampling.with_overrides(**overrides)


def prepare_request(model: Model, tokenizer: HarmonyTokenizer, prompt: Prompt, *,
                    max_tokens: int = DEFAULT_MAX_TOKENS, sampling: SamplingParams | None = None,
                    logits_processors: Sequence[LogitsProcessor] = (),
                    render_config: RenderConversationConfig | None = None,
                    response_format: Any = None, constrain_tools: bool = True,
                    tool_choice: Any = None, max_reasoning_tokens: int | None = None,
                    temperature: float | None = None, top_p: float | None = None,
                    top_k: int | None = None, min_p: float | None = None,
                    seed: int | None = None, **prompt_options) -> HarmonyRequest:
    """Render `prompt`, compile its constraint (a bad schema fails here, before any model
    work), bind the processors to a fresh parser. See `stream_generate` for the arguments."""
    check_max_tokens(max_tokens)
    tool_choice = "auto" if tool_choice is None else tool_choice
    chosen = tool_choice != "auto"
    functions = prompt_options.get("functions", ()) if constrain_tools or chosen else ()
    constraint = None
    if response_format is not None or functions or chosen or max_reasoning_tokens is not None:
        from .constrained import JsonSchemaConstraint  # noqa: I001 (llguidance only when used)

        constraint = JsonSchemaConstraint.from_schema(
            tokenizer, response_format, tools=functions, tool_choice=tool_choice,
            max_reasoning_tokens=max_reasoning_tokens)
        if response_format is not None and isinstance(prompt, str):
            prompt_options["response_format"] = constraint.response_format
    ids = render_prompt(prompt, tokenizer, render_config, **prompt_options)
    sampling = sampling_for(model, sampling, temperature=temperature, top_p=top_p, top_k=top_k,
                            min_p=min_p, seed=seed)
    processors = list(logits_processors)
    if constraint is not None:
        processors.append(constraint.processor(ids, max_tokens=max_tokens))
    parser = StreamParser(tokenizer, Role.ASSISTANT)
    for processor in processors:
        if hasattr(processor, "bind"):
            processor.bind(parser)
    config = getattr(model, "generation_config", None)  # set by `load` from the model dir
    stops = config.stop_tokens(tokenizer) if config is not None else tokenizer.eos_token_ids
    return HarmonyRequest(ids, sampling, max_tokens, processors, parser, frozenset(stops))


def stream_generate(model: Model, tokenizer: HarmonyTokenizer, prompt: Prompt, *,
                    max_tokens: int = DEFAULT_MAX_TOKENS, sampling: SamplingParams | None = None,
                    temperature: float | None = None, top_p: float | None = None,
                    top_k: int | None = None, min_p: float | None = None,
                    seed: int | None = None,
                    logits_processors: Sequence[LogitsProcessor] = (),
                    prompt_cache: PromptCache | None = None,
                    render_config: RenderConversationConfig | None = None,
                    response_format: Any = None, constrain_tools: bool = True,
                    tool_choice: Any = None, max_reasoning_tokens: int | None = None,
                    kv_bits: int | None = None,
                    wrap_sampler: Callable[[Callable[[mx.array], mx.array]],
                                           Callable[[mx.array], mx.array]] | None = None,
                    **prompt_options) -> Iterator[Event | GenerationResult]:
    """Yield harmony events as tokens are sampled, then one `GenerationResult`.

    `prompt`: a user message (str; `prompt_options` such as `reasoning_effort`, `system`,
    `developer`, `functions`, `python_tool`, `date` shape the rest of the conversation), a
    `Conversation` or list of `Message`s (rendered for the assistant's completion), or token ids
    ending where the assistant's header starts (after `<|start|>assistant`).

    Sampling: `sampling` (a `SamplingParams`), else the model's generation config if
    `mlx_gptoss.load` read one, else temperature 1.0, top-p 1.0; `temperature`, `top_p`,
    `top_k`, `min_p` and `seed` override single fields (temperature 0 is greedy).

    `response_format` (a JSON Schema dict or a pydantic model class) makes the final answer JSON
    that validates against it (`mlx_gptoss.constrained`); a text prompt also describes it in the
    developer message (for messages or ids, add `constrained.response_format_of(schema)` to your
    developer message). `constrain_tools`: arguments of calls to `functions` validate too.
    `tool_choice`: "auto" (default), "none", "required" (some function of `functions` is
    called), or a named function (`{"type": "function", "name": NAME}`), guaranteed by the
    decoder. `max_reasoning_tokens`: the analysis is closed after that many tokens (and early
    enough that a constrained answer still fits in `max_tokens`). With a response format the
    decoder writes the whole message structure; `result.complete` is False if `max_tokens`
    still cut the answer off.
    `prompt_cache` reuses (and keeps) the keys and values of a previous call's shared prefix;
    without one, `kv_bits` (8 or 4) keeps the full-attention layers' keys and values quantized
    (a `PromptCache.for_model(model, kv_bits=...)` does the same for a reused cache).
    `wrap_sampler(sampler)`: replaces the sampler the resolved sampling settings make, by one
    built on it (a server across ranks takes rank 0's token on every rank:
    `distributed.synchronized_sampler`).
    """
    request = prepare_request(model, tokenizer, prompt, max_tokens=max_tokens, sampling=sampling,
                              logits_processors=logits_processors, render_config=render_config,
                              response_format=response_format, constrain_tools=constrain_tools,
                              tool_choice=tool_choice,
                              max_reasoning_tokens=max_reasoning_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              seed=seed, **prompt_options)
    stats = GenerationStats()
    tokens: list[int] = []
    sampler = make_sampler(request.sampling)
    stream = generate_tokens(model, request.ids,
                             sampler=sampler if wrap_sampler is None else wrap_sampler(sampler),
                             max_tokens=max_tokens, stop_tokens=request.stop_tokens,
                             logits_processors=request.processors, prompt_cache=prompt_cache,
                             stats=stats, kv_bits=kv_bits)
    try:
        for token in stream:
            tokens.append(token)
            yield from request.parser.feed(token)
    finally:
        stream.close()  # on an early exit, leaves the prompt cache consistent now, not at GC
    events, result = request.result(tokens, stats)
    yield from events
    yield result


def generate(model: Model, tokenizer: HarmonyTokenizer, prompt: Prompt, *,
             max_tokens: int = DEFAULT_MAX_TOKENS, sampling: SamplingParams | None = None,
             temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, min_p: float | None = None, seed: int | None = None,
             response_format: Any = None, **options) -> GenerationResult:
    """Generate one answer; `result.text` is the final answer, `result.reasoning` the chain
    of thought, `result.stop` why it ended. Takes every argument of `stream_generate`:

        generate(model, tok, "Why is the sky blue?", temperature=0.7, seed=1,
                 reasoning_effort="low", max_tokens=512)
    """
    result = None
    for event in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                 sampling=sampling, temperature=temperature, top_p=top_p,
                                 top_k=top_k, min_p=min_p, seed=seed,
                                 response_format=response_format, **options):
        result = event
    return result


def event_to_dict(event: Event | GenerationResult, channel: str | None = None) -> dict[str, Any]:
    """A JSON-ready dict for one event (`--json` prints one per line).

    `channel` is the channel of the open message, for text deltas (which do not carry it).
    """
    if isinstance(event, MessageStart):
        return {"type": "message_start", "index": event.index, "role": event.author.role.value,
                "name": event.author.name, "channel": event.channel,
                "recipient": event.recipient, "content_type": event.content_type}
    if isinstance(event, TextDelta):
        return {"type": "text", "index": event.index, "channel": channel, "text": event.text}
    if isinstance(event, MessageEnd):
        return {"type": "message_end", "index": event.index, "stop": event.stop,
                "message": event.message.to_dict()}
    if isinstance(event, ToolCall):
        return {"type": "tool_call", "index": event.index, "recipient": event.recipient,
                "arguments": event.arguments}
    if isinstance(event, AnswerDone):
        return {"type": "answer_done", "index": event.index}
    if isinstance(event, Recovery):
        return {"type": "recovery", "token_index": event.token_index, "reason": event.reason}
    if isinstance(event, GenerationResult):
        return {"type": "done", "stop": event.stop, "text": event.text,
                "stats": event.stats.to_dict()}
    raise TypeError(f"not a generation event: {event!r}")
