"""`smoothserve serve`: load the model, start the engine thread and serve HTTP with uvicorn.

Shutdown. The first SIGTERM (or SIGINT) starts a drain: the listening socket stays open, new completions
get 503 with Retry-After and /ready turns 503 (so a load balancer stops sending), in-flight requests run
to completion for up to `shutdown_timeout_s`, then whatever is left is ended (a 503 error, or an SSE
error event and [DONE]) and the process exits 0. A second signal stops without waiting for the drain.
An engine failure ends the process with status 1, so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from types import FrameType

import uvicorn

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from server.app import ServerState, create_app
from server.engine_client import EngineClient, ServerShuttingDownError
from server.fault_injection import install_faults
from server.metrics import ServerMetrics

logger = logging.getLogger("smoothserve.server")

# After the drain, uvicorn waits this long for the last responses (the error events) to be written.
FLUSH_GRACE_S = 5
DRAIN_POLL_S = 0.05


def build_state(config: EngineConfig) -> ServerState:
    engine = LLMEngine(config)
    install_faults(engine)
    model_name = config.server.served_model_name or Path(config.model.model.rstrip("/")).name
    metrics = ServerMetrics(model_name)
    client = EngineClient(engine, on_step=metrics.update_engine)
    return ServerState(client=client, tokenizer=engine.tokenizer, metrics=metrics, config=config.server,
                       model_name=model_name, vocab_size=engine.model.arch.vocab_size)  # fmt: skip


class DrainingServer(uvicorn.Server):
    """uvicorn whose first exit signal drains (see the module docstring) instead of closing the socket."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.drain_requested: str | None = None  # the name of the signal that asked for a drain
        self._drain: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in a signal handler: only note the signal; `on_tick` (in the event loop) starts the drain.
        # uvicorn re-raises the signals it handled once it stops (exiting 128+sig), so the first one
        # stays ours and only a second one goes through uvicorn's own handler.
        if self.drain_requested:
            super().handle_exit(sig, frame)
            return
        self.drain_requested = signal.Signals(sig).name

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and self._drain is None:
            self._drain = asyncio.ensure_future(self.drain())
        if self.state.client.is_dead and not self.should_exit:
            logger.error("engine failed: shutting down")
            self.should_exit = True
        return await super().on_tick(counter)

    async def drain(self) -> None:
        state, timeout = self.state, self.state.config.shutdown_timeout_s
        state.accepting = False
        deadline = time.monotonic() + timeout
        logger.info("%s: draining %d requests (up to %.1f s)", self.drain_requested, state.client.num_requests,
                    timeout)  # fmt: skip
        while state.client.num_requests and time.monotonic() < deadline and not state.client.is_dead:
            await asyncio.sleep(DRAIN_POLL_S)
        if state.client.num_requests and not state.client.is_dead:
            logger.warning("shutdown timeout: ending %d requests", state.client.num_requests)
            state.client.abort_all(ServerShuttingDownError("the server is shutting down"))
        self.should_exit = True


def serve(config: EngineConfig) -> int:
    """Serve until a signal (see the module docstring); returns the exit status, 1 when the engine failed."""
    state = build_state(config)
    app = create_app(state)
    uv_config = uvicorn.Config(app, host=config.server.host, port=config.server.port, log_level="info",
                               timeout_graceful_shutdown=FLUSH_GRACE_S)  # fmt: skip
    DrainingServer(uv_config, state).run()
    return 1 if state.client.is_dead else 0


def api_key_from_env(flag_value: str | None) -> str | None:
    return flag_value or os.environ.get("SMOOTHSERVE_API_KEY") or None
