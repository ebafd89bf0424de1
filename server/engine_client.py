"""The bridge between the asyncio server and the engine, which runs in its own thread.

Commands (add, abort) go to the engine thread through a thread-safe queue; outputs come back to one
asyncio queue per request. A request whose consumer goes away (client disconnect, cancellation) is
aborted, which frees its KV blocks within one engine step. If the engine fails, every waiting request
gets the error and the client reports itself dead.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams
from engine.scheduler import SchedulerStats

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can be served any more."""


class EngineClient:
    def __init__(self, engine: LLMEngine, on_step: Callable[[SchedulerStats], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step
        self._commands: queue.Queue[tuple] = queue.Queue()
        self._queues: dict[str, asyncio.Queue] = {}
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

    def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Admit a request now (it counts in `num_requests` from this call) and return its outputs as they
        are produced; the last one is finished. Iterating raises ValueError for a request the engine
        refuses and EngineDeadError if the engine fails. Closing the iterator early aborts the request."""
        if self.error is not None:
            raise EngineDeadError("the engine has failed")
        results: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = results
        self._commands.put(("add", request_id, prompt, params))
        return self._outputs(request_id, results)

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
            self._queues.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    # ----------------------------------------------------------------------------------------------
    # Engine thread

    def _deliver(self, request_id: str, item: object) -> None:
        # A finished (or failed) request stops counting as admitted here, even if nobody reads it.
        last = isinstance(item, BaseException) or getattr(item, "finished", False)
        target = self._queues.pop(request_id, None) if last else self._queues.get(request_id)
        if target is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(target.put_nowait, item)

    def _handle(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt, params = command
            if request_id not in self._queues:  # its consumer is already gone
                return
            try:
                self.engine.add_request(request_id, prompt, params)
            except ValueError as error:
                self._deliver(request_id, error)
            except Exception as error:
                logger.exception("request %s could not be added", request_id)
                self._deliver(request_id, RuntimeError(f"request could not be added: {type(error).__name__}"))
        elif command[0] == "abort":
            self.engine.abort_request(command[1])

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:  # idle: wait a little for work; busy: take what is there and step
                    idle = not self.engine.has_unfinished_requests()
                    self._handle(self._commands.get(timeout=IDLE_WAIT_S) if idle else self._commands.get_nowait())
                    while True:
                        self._handle(self._commands.get_nowait())
                except queue.Empty:
                    pass
                if not self.engine.has_unfinished_requests():
                    continue
                for output in self.engine.step():
                    # The engine keeps mutating its outputs: hand over a copy.
                    self._deliver(output.request_id, copy.deepcopy(output))
                if self.on_step is not None:
                    self.on_step(self.engine.stats())
        except BaseException as error:
            logger.exception("engine failed")
            self.error = error
            dead = EngineDeadError(f"the engine failed: {type(error).__name__}")
            for request_id in list(self._queues):
                self._deliver(request_id, dead)
