"""`smoothserve serve`: load the model, start the engine thread and serve HTTP with uvicorn."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from engine.config import EngineConfig, ServerConfig
from engine.llm_engine import LLMEngine
from server.app import ServerState, create_app
from server.engine_client import EngineClient
from server.metrics import ServerMetrics

logger = logging.getLogger("smoothserve.server")


def build_state(config: EngineConfig) -> ServerState:
    engine = LLMEngine(config)
    model_name = config.server.served_model_name or Path(config.model.model.rstrip("/")).name
    metrics = ServerMetrics(model_name)
    client = EngineClient(engine, on_step=metrics.update_engine)
    return ServerState(client=client, tokenizer=engine.tokenizer, metrics=metrics, config=config.server,
                       model_name=model_name, vocab_size=engine.model.arch.vocab_size)  # fmt: skip


def serve(config: EngineConfig) -> int:
    """Serve until SIGINT/SIGTERM (graceful: in-flight requests get `shutdown_timeout_s`); returns the exit
    status, non-zero when the engine failed so that a supervisor restarts the server."""
    import uvicorn

    state = build_state(config)
    server_config: ServerConfig = config.server
    app = create_app(state)
    uv_config = uvicorn.Config(app, host=server_config.host, port=server_config.port, log_level="info",
                               timeout_graceful_shutdown=int(server_config.shutdown_timeout_s))  # fmt: skip
    server = uvicorn.Server(uv_config)

    async def run() -> None:
        async def watch_engine() -> None:
            while not server.should_exit:
                if state.client.is_dead:
                    logger.error("engine failed: shutting down")
                    server.should_exit = True
                await asyncio.sleep(0.2)

        watcher = asyncio.ensure_future(watch_engine())
        await server.serve()
        watcher.cancel()

    asyncio.run(run())
    return 1 if state.client.is_dead else 0


def api_key_from_env(flag_value: str | None) -> str | None:
    return flag_value or os.environ.get("SMOOTHSERVE_API_KEY") or None
