"""The batched engine: many sequences decoding together, joining and leaving at any step.

Each step (`Engine.step`):
1. admits waiting requests while fewer than `max_batch` are active: checks their ids, takes a
   prompt cache from the pool (the longest cached prefix), and queues what is left to prefill;
2. prefills one chunk (at most `prefill_chunk` tokens) of one admitted request, so a long
   prompt never stalls the others for more than one chunk;
3. decodes one token for every running row in one batched forward pass
   (`Model.step_rows`: per-row offsets, the rows' caches stacked into one buffer per layer
   while the rows stay the same, so a step costs the same graph at 8 rows as at 1);
4. samples every row that has fresh logits with its own logits processors, sampler and seed,
   evaluates all the tokens at once, and delivers them (`Request.on_token`, in this thread).

A row ends on one of its stop tokens, at its `max_tokens`, when cancelled, or when its own
processor or callback fails; the others go on. Its cache then returns to the pool holding
exactly the prompt and the tokens that were fed (the last sampled token never is), as the
single-sequence loop leaves a `PromptCache`.

Exactness: a row's attention is the single-sequence computation over its own cache, and the
batched matrix products compute each row as they would alone, so at temperature 0 a row's
tokens equal `generate`'s for the same prompt; a seeded row draws from its own key chain, so
what it samples does not depend on the batch.

Two ways to drive it: `step()` / `run()` in the caller's thread (`batch_generate`), or
`stream_generate(...)` from any number of threads: a worker thread then runs the steps and each
caller iterates its own harmony events; closing that iterator cancels its row at once.
`mlx_gptoss.generate`'s pipelined single-sequence loop stays the low-latency path for one
sequence; this engine is the path for many.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx

from .cache import DEFAULT_SLIDING_SLACK, PromptCache, PromptCachePool
from .defaults import DEFAULT_MAX_TOKENS
from .errors import GptOssError
from .generate import (
    GenerationResult,
    GenerationStats,
    HarmonyRequest,
    LogitsProcessor,
    check_max_tokens,
    check_prompt_ids,
    prepare_request,
)
from .harmony import Event, HarmonyTokenizer
from .model import Model
from .prompts import Prompt
from .sampling import SamplingParams, make_sampler

DEFAULT_PREFILL_CHUNK = 512  # tokens per prefill step: bounds the others' wait for a token
DEFAULT_MAX_BATCH = 8
DEFAULT_POOL_BYTES = 2 << 30


@dataclass
class Request:
    """One sequence for the engine: token ids in, token ids out."""

    prompt: Sequence[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop_tokens: frozenset[int] = frozenset()
    logits_processors: Sequence[LogitsProcessor] = ()
    # Called in the engine's thread with each sampled token, before the next step's processors
    # run (so a constraint's parser is current). An exception ends this row only.
    on_token: Callable[[int], None] | None = None
    on_end: Callable[[], None] | None = None  # called once when the row ends, for any reason

    # --- set by the engine
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: BaseException | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)

    def cancel(self) -> None:
        """Stop this row at the next step (safe from any thread); its memory is freed then."""
        self._cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    _cancelled: bool = field(default=False, repr=False)


@dataclass
class _Row:
    request: Request
    cache: PromptCache
    sampler: Callable[[mx.array], mx.array]
    todo: list[int]  # prompt tokens still to prefill
    started: float
    marks: list[int] = field(default_factory=list)  # prompt positions to snapshot, ascending
    logits: mx.array | None = None  # fresh next-token logits [vocab], to sample from
    pending: int | None = None  # a sampled token not yet run through the model
    first_token_at: float | None = None


class Engine:
    """Continuous batching over one model (see the module docstring).

    `cache_pool`: a `PromptCachePool` shared by the requests (default: one of
    `DEFAULT_POOL_BYTES`), or None for no reuse across requests.
    """

    def __init__(self, model: Model, tokenizer: HarmonyTokenizer | None = None, *,
                 max_batch: int = DEFAULT_MAX_BATCH, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 cache_pool: PromptCachePool | None | str = "default",
                 sliding_slack: int = DEFAULT_SLIDING_SLACK, kv_bits: int | None = None):
        if max_batch < 1:
            raise GptOssError(f"max_batch must be at least 1, got {max_batch}")
        if prefill_chunk < 1:
            raise GptOssError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.sliding_slack = sliding_slack
        self.kv_bits = kv_bits  # 8 or 4: quantized full-layer caches (see QuantizedKVCache)
        if cache_pool == "default":
            cache_pool = PromptCachePool(model, max_bytes=DEFAULT_POOL_BYTES,
                                         sliding_slack=sliding_slack, kv_bits=kv_bits)
        self.pool: PromptCachePool | None = cache_pool
        # Prefill stops and snapshots the caches after each message's <|end|>: where the
        # prompts of different requests (or turns) part, a pooled cache can rewind to exactly.
        self.snapshot_after = frozenset() if tokenizer is None else frozenset({tokenizer.end})
        self._waiting: list[Request] = []
        self._rows: list[_Row] = []  # admitted: prefilling or decoding, in admission order
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        self._closed = False

    # ----------------------------------------------------------------- the synchronous core

    def add(self, request: Request) -> Request:
        """Queue a request (thread-safe); it is admitted at a coming step."""
        with self._wake:
            if self._closed:
                raise GptOssError("the engine is closed")
            self._waiting.append(request)
            self._wake.notify()
        return request

    @property
    def has_work(self) -> bool:
        return bool(self._rows or self._waiting)

    def step(self) -> None:
        """One engine step (see the module docstring); call from one thread only."""
        self._drop_cancelled()
        self._admit()
        prefilling = next((r for r in self._rows if r.todo), None)
        if prefilling is not None:
            self._guard(prefilling, self._prefill_chunk, prefilling)
        decoding = [r for r in self._rows if r.pending is not None and not r.request.done]
        if decoding:
            self._decode(decoding)
        ready = [r for r in self._rows if r.logits is not None and not r.request.done]
        if ready:
            self._sample(ready)
        self._retire()

    def run(self) -> None:
        """Step until every queued request is done."""
        while self.has_work:
            self.step()

    # ----------------------------------------------------------------- the steps

    def _admit(self) -> None:
        with self._lock:
            room = self.max_batch - len(self._rows)
            admitted, self._waiting = self._waiting[:max(room, 0)], self._waiting[max(room, 0):]
        for request in admitted:
            try:
                self._rows.append(self._row(request))
            except Exception as e:  # a bad request fails alone
                request.error, request.finish_reason = e, "error"
                _ended(request)

    def _row(self, request: Request) -> _Row:
        prompt = [int(t) for t in request.prompt]
        if not prompt:
            raise GptOssError("the prompt is empty")
        check_prompt_ids(self.model, prompt)
        check_max_tokens(request.max_tokens)
        cache = (self.pool.acquire(prompt) if self.pool is not None
                 else PromptCache.for_model(self.model, self.sliding_slack, self.kv_bits))
        todo = cache.prepare(prompt)
        request.stats.prompt_tokens = len(prompt)
        request.stats.cached_tokens = len(prompt) - len(todo)
        done = len(prompt) - len(todo)
        marks = [i + 1 for i in range(done, len(prompt) - 1) if prompt[i] in self.snapshot_after]
        row = _Row(request, cache, make_sampler(request.sampling), todo, time.perf_counter(),
                   marks=marks)
        if not todo:  # the very same prompt again: its logits were kept
            row.logits = cache.logits[0]
        return row

    def _prefill_chunk(self, row: _Row) -> None:
        size = self.prefill_chunk
        while row.marks and row.marks[0] <= row.cache.offset:
            row.marks.pop(0)
        if row.marks:
            size = min(size, row.marks[0] - row.cache.offset)
        chunk, row.todo = row.todo[:size], row.todo[size:]
        last = not row.todo
        logits = self.model(mx.array([chunk]), cache=row.cache.layers, last_only=last)
        row.cache.advance(chunk)
        if last:
            logits = logits[:, -1, :]
            mx.eval(logits, [c.state for c in row.cache.layers])
            row.cache.mark(logits)
            row.logits = logits[0]
        else:
            mx.eval([c.state for c in row.cache.layers])
            if row.marks and row.marks[0] == row.cache.offset:
                row.cache.mark()

    def _decode(self, rows: list[_Row]) -> None:
        tokens = mx.array([r.pending for r in rows])
        logits = self.model.step_rows(tokens, [r.cache.layers for r in rows])
        for i, row in enumerate(rows):
            row.cache.advance([row.pending])
            row.pending = None
            row.logits = logits[i]

    def _sample(self, rows: list[_Row]) -> None:
        chosen: list[tuple[_Row, mx.array]] = []
        for row in rows:
            logits, row.logits = row.logits, None
            sampled = self._guard(row, self._choose, row, logits)
            if sampled is not None:
                chosen.append((row, sampled))
        if not chosen:
            return
        mx.eval([token for _, token in chosen])
        now = time.perf_counter()
        peak = mx.get_peak_memory()
        for row, sampled in chosen:
            token = int(sampled.item())
            request = row.request
            request.tokens.append(token)
            stats = request.stats
            if row.first_token_at is None:
                row.first_token_at = now
                stats.prompt_time = now - row.started
            stats.generation_tokens = len(request.tokens)
            stats.generation_time = now - row.first_token_at
            stats.peak_memory = peak
            if token in request.stop_tokens:
                request.finish_reason = "stop"
            elif len(request.tokens) >= request.max_tokens:
                request.finish_reason = "length"
            else:
                row.pending = token
            if request.on_token is not None:
                self._guard(row, request.on_token, token)

    @staticmethod
    def _choose(row: _Row, logits: mx.array) -> mx.array:
        processors = row.request.logits_processors
        if processors:
            logits = logits.astype(mx.float32)
            for processor in processors:
                logits = processor(row.request.tokens, logits)
        return row.sampler(logits)

    def _guard(self, row: _Row, fn: Callable, *args) -> Any:
        """Run `fn` for one row; an exception ends that row, not the engine."""
        try:
            return fn(*args)
        except Exception as e:
            row.request.error, row.request.finish_reason = e, "error"
            return None

    def _drop_cancelled(self) -> None:
        for row in self._rows:
            if row.request._cancelled and not row.request.done:
                row.request.finish_reason = "cancelled"
        with self._lock:
            cancelled = [r for r in self._waiting if r._cancelled]
            self._waiting = [r for r in self._waiting if not r._cancelled]
        for request in cancelled:
            request.finish_reason = "cancelled"
            _ended(request)

    def _retire(self) -> None:
        """Finished rows leave the batch; their caches go back to the pool."""
        keep = []
        for row in self._rows:
            if row.request.done:
                if self.pool is not None and not row.todo:
                    self.pool.release(row.cache, reused=row.request.stats.cached_tokens)
                _ended(row.request)
            else:
                keep.append(row)
        self._rows = keep

    # ----------------------------------------------------------------- threaded use

    def stream_generate(self, prompt: Prompt, **options) -> Iterator[Event | GenerationResult]:
        """Like `mlx_gptoss.stream_generate` (same arguments, same events, then one
        `GenerationResult`), batched with every other stream of this engine. Thread-safe;
        closing the iterator cancels the row. `prompt_cache` is not taken: the pool is shared.
        A failure of this request (its processor, its callback) raises here only."""
        if self.tokenizer is None:
            raise GptOssError("Engine.stream_generate needs the engine's tokenizer")
        if "prompt_cache" in options:
            raise TypeError("Engine.stream_generate shares the engine's cache pool; "
                            "prompt_cache does not apply")
        harmony = prepare_request(self.model, self.tokenizer, prompt, **options)
        events: queue.SimpleQueue = queue.SimpleQueue()
        request = _harmony_request(harmony, events.put)
        self._ensure_worker()
        self.add(request)
        try:
            while True:
                item = events.get()
                if item is _DONE:
                    break
                yield item
        finally:
            request.cancel()
        if request.error is not None:
            raise request.error
        if request.finish_reason == "cancelled":
            raise GptOssError("the generation was cancelled (the engine closed)")
        events_left, result = harmony.result(request.tokens, request.stats)
        yield from events_left
        yield result

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._serve, name="mlx-gptoss-engine",
                                                daemon=True)
                self._worker.start()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._rows or self._waiting or self._closed):
                    self._wake.wait()
                if self._closed and not (self._rows or self._waiting):
                    return
            try:
                self.step()
            except Exception as e:  # the batch itself failed (e.g. out of memory)
                self._fail_all(e)

    def _fail_all(self, error: BaseException) -> None:
        """End every row with `error` (each consumer raises it), keeping the engine usable."""
        with self._lock:
            waiting, self._waiting = self._waiting, []
        rows, self._rows = self._rows, []
        for request in [r.request for r in rows] + waiting:
            if not request.done:
                request.error, request.finish_reason = error, "error"
            _ended(request)

    def close(self) -> None:
        """Cancel everything and stop the worker thread."""
        with self._wake:
            self._closed = True
            for request in self._waiting:
                request.cancel()
            for row in self._rows:
                row.request.cancel()
            self._wake.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DONE = object()


def _harmony_request(harmony: HarmonyRequest, emit: Callable[[Any], None]) -> Request:
    """An engine request whose tokens feed the harmony parser; `emit` gets each event, then
    `_DONE` when the row ends, whatever the reason."""
    request = Request(harmony.ids, harmony.sampling, harmony.max_tokens, harmony.stop_tokens,
                      harmony.processors)
    request.on_token = lambda token: [emit(event) for event in harmony.parser.feed(token)]
    request.on_end = lambda: emit(_DONE)
    return request


def _ended(request: Request) -> None:
    if request.on_end is not None:
        try:
            request.on_end()
        except Exception:  # a consumer's callback cannot stop the engine
            pass


def batch_generate(model: Model, tokenizer: HarmonyTokenizer, prompts: Sequence[Prompt], *,
                   max_tokens: int = DEFAULT_MAX_TOKENS,
                   sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                   response_format: Any = None, max_batch: int | None = None,
                   prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                   **options) -> list[GenerationResult]:
    """Generate an answer for every prompt at once; results in prompt order, each the same
    `GenerationResult` that `generate` returns.

    `sampling` and `response_format`: one for all, or a list with one per prompt (None for an
    unconstrained one). Every other keyword is `generate`'s (`temperature`, `seed`,
    `reasoning_effort`, ...), applied to every prompt. A prompt that fails (bad ids, a bad
    schema) raises before any generation starts."""
    n = len(prompts)
    samplings = _per_prompt(sampling, n, "sampling")
    formats = _per_prompt(response_format, n, "response_format")
    harmonies = [prepare_request(model, tokenizer, p, max_tokens=max_tokens, sampling=s,
                                 response_format=f, **options)
                 for p, s, f in zip(prompts, samplings, formats)]
    engine = Engine(model, tokenizer, max_batch=max_batch or max(n, 1),
                    prefill_chunk=prefill_chunk, cache_pool=None)
    # The events are not streamed here: each parser keeps its messages for the result.
    requests = [engine.add(_harmony_request(h, lambda event: None)) for h in harmonies]
    engine.run()
    results = []
    for harmony, request in zip(harmonies, requests):
        if request.error is not None:
            raise request.error
        results.append(harmony.result(request.tokens, request.stats)[1])
    return results


def _per_prompt(value: Any, n: int, name: str) -> list[Any]:
    """One value per prompt from one value (or None) or a list of them."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise GptOssError(f"{name}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n
