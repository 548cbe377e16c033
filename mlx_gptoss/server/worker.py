"""The one place the server touches the model: admission, a bounded queue, cancellation.

Every generation runs in its own thread (MLX and the generation loop are synchronous) and hands
its harmony events to the request's asyncio task through a queue. `Worker.start` admits a
request or refuses it at once with 429 (`--max-concurrency` decoding plus `--max-queue`
waiting); a started request that is cancelled (its client went away) stops within one token,
also while it still waits for a slot, and its row is freed.

Backend: `stream_generate` over one shared `PromptCache` (so a conversation's next turn, or a
`previous_response_id` continuation, prefills only what is new), one request decoding at a time
and the others waiting in order. When a batched engine is given
(`Engine.stream_generate(prompt, **same keywords)`), up to `max_concurrency` requests decode
at once through it and the prompt-cache pool is the engine's.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

from ..cache import PromptCache
from ..generate import GenerationResult, stream_generate
from .protocol import APIError

log = logging.getLogger("mlx_gptoss.server")
CALL_SLACK = 128  # sliding-window keys kept past the window: a re-rendered call rewinds by trimming
_END = object()


@dataclass(frozen=True)
class JobRecord:
    """How a generation ended (kept for observability and tests)."""

    prompt_tokens: int
    events: int
    cancelled: bool
    error: str | None
    result: GenerationResult | None


class Slots:
    """A FIFO counting semaphore whose waiters give up when their request is cancelled."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.busy = 0
        self.waiting: deque[object] = deque()
        self.cond = threading.Condition()

    def acquire(self, cancelled: threading.Event) -> bool:
        me = object()
        with self.cond:
            self.waiting.append(me)
            try:
                while not cancelled.is_set() and (self.busy >= self.capacity or self.waiting[0] is not me):
                    self.cond.wait()
                if cancelled.is_set():
                    return False
                self.busy += 1
                return True
            finally:
                self.waiting.remove(me)
                self.cond.notify_all()

    def release(self) -> None:
        with self.cond:
            self.busy -= 1
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


class Stream:
    """One request's generation, seen from its asyncio task: iterate it, or `cancel()` it."""

    def __init__(self, worker: "Worker", loop: asyncio.AbstractEventLoop):
        self.worker = worker
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.done = threading.Event()

    def push(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.worker.slots.wake()

    async def events(self) -> AsyncIterator[Any]:
        """The harmony events, then the `GenerationResult`; the generation's error re-raised."""
        try:
            while True:
                item = await self.queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()  # a no-op when the generation ended by itself


class Worker:
    """Admits requests and runs their generations (see the module docstring)."""

    def __init__(self, model, tokenizer, *, max_concurrency: int = 1, max_queue: int = 16,
                 engine: Any = None):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        # Without the engine one request decodes at a time, whatever --max-concurrency says.
        self.slots = Slots(max_concurrency if engine is not None else 1)
        self.capacity = max_concurrency + max_queue
        self.admitted = 0
        self._admission = threading.Lock()
        self.cache = None if engine is not None else PromptCache.for_model(model, sliding_slack=CALL_SLACK)
        self.records: deque[JobRecord] = deque(maxlen=256)
        self.finished = threading.Condition()

    def _generate(self, prompt: list[int], options: dict[str, Any]) -> Iterator[Any]:
        if self.engine is not None:
            return self.engine.stream_generate(prompt, **options)
        return stream_generate(self.model, self.tokenizer, prompt, prompt_cache=self.cache, **options)

    def start(self, prompt: list[int], **options: Any) -> Stream:
        """Admit and start a generation of `prompt` (token ids) with `stream_generate`'s
        keywords, or raise 429 when the queue is full."""
        with self._admission:
            if self.admitted >= self.capacity:
                raise APIError(429, "the server is busy (its request queue is full); retry later",
                               type="rate_limit_exceeded", code="rate_limit_exceeded")
            self.admitted += 1
        stream = Stream(self, asyncio.get_running_loop())
        threading.Thread(target=self._run, args=(stream, prompt, options), daemon=True,
                         name="mlx-gptoss-generation").start()
        return stream

    def _run(self, stream: Stream, prompt: list[int], options: dict[str, Any]) -> None:
        events, result, error = 0, None, None
        try:
            if self.slots.acquire(stream.cancelled):
                try:
                    generation = self._generate(prompt, options)
                    try:
                        for event in generation:
                            if stream.cancelled.is_set():
                                break
                            events += 1
                            if isinstance(event, GenerationResult):
                                result = event
                            stream.push(event)
                    finally:
                        generation.close()  # frees the row (and leaves the cache consistent) now
                finally:
                    self.slots.release()
        except BaseException as e:  # reported to this request only
            error = f"{type(e).__name__}: {e}"
            if not isinstance(e, Exception) or type(e).__module__.split(".")[0] != "mlx_gptoss":
                log.exception("generation failed")
            stream.push(e)
        finally:
            with self._admission:
                self.admitted -= 1
            stream.push(_END)
            with self.finished:
                self.records.append(JobRecord(len(prompt), events, stream.cancelled.is_set(),
                                              error, result))
                self.finished.notify_all()
            stream.done.set()

    def wait_for_record(self, predicate: Callable[[JobRecord], bool], timeout: float) -> JobRecord | None:
        """The first finished generation matching `predicate`, waiting up to `timeout` s."""
        with self.finished:
            found: list[JobRecord] = []

            def match() -> bool:
                found[:] = [r for r in self.records if predicate(r)]
                return bool(found)

            self.finished.wait_for(match, timeout)
            return found[0] if found else None

    def close(self) -> None:
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()
