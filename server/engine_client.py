"""The bridge between the asyncio server and the engine, which runs in its own thread.

Commands (add, abort) go to the engine thread through a thread-safe queue; outputs come back to one
asyncio queue per request. A request whose consumer goes away (client disconnect, cancellation) is
aborted, which frees its KV blocks within one engine step. If the engine fails, every waiting request
gets the error and the client reports itself dead. On shutdown, `abort_all` ends what is left.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

from engine.llm_engine import LLMEngine, StepTiming
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams
from engine.scheduler import SchedulerStats

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can be served any more."""


class ServerShuttingDownError(RuntimeError):
    """The request was ended by a shutdown that could not wait for it any longer; the client may retry."""


# Called from the engine thread after each step (or batch of aborts): the scheduler's stats and the queue
# times (seconds from admission to first being scheduled) of the requests that started in that step.
StepCallback = Callable[[SchedulerStats, Sequence[float], StepTiming | None], None]


def _put_all(puts: list[tuple[asyncio.Queue, object]]) -> None:
    for target, item in puts:
        target.put_nowait(item)


class EngineClient:
    def __init__(self, engine: LLMEngine, on_step: StepCallback | None = None) -> None:
        self.engine = engine
        self.on_step = on_step
        self._commands: queue.Queue[tuple] = queue.Queue()
        self._queues: dict[str, asyncio.Queue] = {}
        # Prompt tokens per admitted request, for admission control; written by both threads, hence the lock.
        self._prompt_tokens: dict[str, int] = {}
        self._tokens_lock = threading.Lock()
        self._queued_tokens = 0
        self._admitted_at: dict[str, float] = {}  # engine thread only: requests not yet scheduled
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ----------------------------------------------------------------------------------------------
    # Event-loop side

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="smoothserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def is_dead(self) -> bool:
        return self.error is not None

    @property
    def num_requests(self) -> int:
        """Requests admitted and not finished (queued or running)."""
        return len(self._queues)

    @property
    def num_queued_tokens(self) -> int:
        """Prompt tokens of the requests admitted and not finished."""
        return self._queued_tokens

    def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, prompt_token_ids: list[int]
    ) -> AsyncIterator[RequestOutput]:
        """Admit a request now (it counts in `num_requests`, and its prompt tokens in `num_queued_tokens`,
        from this call) and return its outputs as they are produced; the last one is finished.
        `prompt_token_ids` are the prompt's ids as the engine sees them (`encode_prompt`), computed by the
        caller so the engine thread does not tokenize. Iterating raises ValueError for a request the engine
        refuses, EngineDeadError if the engine fails and ServerShuttingDownError from `abort_all`. Closing
        the iterator early aborts it."""
        if self.error is not None:
            raise EngineDeadError("the engine has failed")
        results: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = results
        with self._tokens_lock:
            self._prompt_tokens[request_id] = len(prompt_token_ids)
            self._queued_tokens += len(prompt_token_ids)
        self._commands.put(("add", request_id, prompt, params, prompt_token_ids, time.monotonic()))
        return self._outputs(request_id, results)

    def abort_all(self, error: BaseException) -> None:
        """End every admitted request with `error` (its KV blocks are freed by the engine thread)."""
        self._commands.put(("abort_all", error))

    def _release(self, request_id: str) -> asyncio.Queue | None:
        """Stop counting a request as admitted; returns its output queue if it still had one."""
        with self._tokens_lock:
            self._queued_tokens -= self._prompt_tokens.pop(request_id, 0)
        return self._queues.pop(request_id, None)

    async def _outputs(self, request_id: str, results: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await results.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._release(request_id)
            if not finished:
                self._commands.put(("abort", request_id))

    # ----------------------------------------------------------------------------------------------
    # Engine thread

    def _deliver(self, request_id: str, item: object) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, object]]) -> None:
        """Hand items to their streams with one wake-up of the event loop (a step's outputs go together)."""
        puts = []
        for request_id, item in items:
            # A finished (or failed) request stops counting as admitted here, even if nobody reads it.
            last = isinstance(item, BaseException) or getattr(item, "finished", False)
            target = self._release(request_id) if last else self._queues.get(request_id)
            if target is not None:
                puts.append((target, item))
        if puts and self._loop is not None:
            self._loop.call_soon_threadsafe(_put_all, puts)

    def _handle(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt, params, prompt_token_ids, admitted_at = command
            if request_id not in self._queues:  # its consumer is already gone
                return
            try:
                self.engine.add_request(request_id, prompt, params, prompt_token_ids)
                self._admitted_at[request_id] = admitted_at
            except ValueError as error:
                self._deliver(request_id, error)
            except Exception as error:
                logger.exception("request %s could not be added", request_id)
                self._deliver(request_id, RuntimeError(f"request could not be added: {type(error).__name__}"))
        elif command[0] == "abort":
            self._abort(command[1])
        elif command[0] == "abort_all":
            for request_id in list(self._queues):
                self._abort(request_id)
                self._deliver(request_id, command[1])

    def _abort(self, request_id: str) -> None:
        self._admitted_at.pop(request_id, None)
        self.engine.abort_request(request_id)

    def _queue_times(self, step_started: float) -> list[float]:
        """Queue times of the requests that were scheduled for the first time in the step just run
        (looked up among the step's requests: the waiting ones are never scanned)."""
        started = []
        for request_id in self.engine.last_step_request_ids:
            admitted_at = self._admitted_at.pop(request_id, None)
            if admitted_at is not None:
                started.append(step_started - admitted_at)
        return started

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                handled = 0
                try:  # idle: wait a little for work; busy: take what is there and step
                    idle = not self.engine.has_unfinished_requests()
                    self._handle(self._commands.get(timeout=IDLE_WAIT_S) if idle else self._commands.get_nowait())
                    handled += 1
                    while True:
                        self._handle(self._commands.get_nowait())
                        handled += 1
                except queue.Empty:
                    pass
                if not self.engine.has_unfinished_requests():
                    if handled and self.on_step is not None:  # aborts free blocks: the gauges must see it
                        self.on_step(self.engine.stats(), (), None)
                    continue
                step_started = time.monotonic()
                # The engine keeps mutating its outputs: hand over copies.
                self._deliver_all([(output.request_id, output.snapshot()) for output in self.engine.step()])
                if self.on_step is not None:
                    self.on_step(self.engine.stats(), self._queue_times(step_started), self.engine.last_step_timing)
        except BaseException as error:
            logger.exception("engine failed")
            self.error = error
            dead = EngineDeadError(f"the engine failed: {type(error).__name__}")
            for request_id in list(self._queues):
                self._deliver(request_id, dead)
