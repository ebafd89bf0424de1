"""`smoothserve serve` as a real process, the way a supervisor runs it: SIGTERM drains in-flight requests
and exits 0, requests that outlive `--shutdown-timeout` are ended, and an engine failure exits non-zero.

The engine is slowed (or broken) through the test-only hooks of `server/fault_injection.py`, so that
streams last long enough to be interrupted on a loaded CI machine."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.fault_injection import FAIL_AFTER_ENV, STEP_DELAY_ENV
from tests.conftest import free_port

API_KEY = "lifecycle-secret-4f1c"
STARTUP_TIMEOUT_S = 120


class ServerProcess:
    """`smoothserve serve` on a tiny model on the CPU, its stdout and stderr in a file."""

    def __init__(self, model_dir: Path, log_path: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "engine.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
                   "--device", "cpu", "--dtype", "float32", "--num-cpu-blocks", "64", "--max-model-len", "256",
                   "--served-model-name", "tiny", "--api-key", API_KEY, *flags]  # fmt: skip
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env or {})})  # fmt: skip
        self._wait_until_healthy()

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited at startup:\n{self.log()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def exit_status(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit within {timeout} s:\n{self.log()}") from None

    def terminate_now(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def start_server(tiny_model_dir: Path, tmp_path: Path) -> Iterator:
    started: list[ServerProcess] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> ServerProcess:
        started.append(ServerProcess(tiny_model_dir, tmp_path / f"server-{len(started)}.log", *flags, env=env))
        return started[-1]

    yield start
    for server in started:
        server.terminate_now()
        assert API_KEY not in server.log(), "the API key reached the server log"


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def completion(max_tokens: int, stream: bool) -> dict:
    return {"model": "tiny", "prompt": "To be, or not to be", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": stream}  # fmt: skip


async def read_stream(client: httpx.AsyncClient, url: str, body: dict, first_chunk: asyncio.Event) -> list[str]:
    """The `data:` payloads of an SSE completion, in order."""
    payloads = []
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=auth()) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                payloads.append(line.removeprefix("data: "))
                first_chunk.set()
    return payloads


async def wait_for_status(client: httpx.AsyncClient, url: str, status: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while (await client.get(url)).status_code != status:
        assert time.monotonic() < deadline, f"{url} never answered {status}"
        await asyncio.sleep(0.02)


async def wait_for_running(client: httpx.AsyncClient, url: str, running: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    gauge = f'smoothserve_requests_running{{model="tiny"}} {float(running)}'
    while gauge not in (await client.get(f"{url}/metrics", headers=auth())).text:
        assert time.monotonic() < deadline, f"never {running} requests running"
        await asyncio.sleep(0.02)


def assert_retryable_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    error = response.json()["error"]
    assert error["type"] == "server_error" and "shut" in error["message"]


def test_sigterm_finishes_in_flight_streams_refuses_new_requests_and_exits_0(start_server) -> None:
    server = start_server("--shutdown-timeout", "60", env={STEP_DELAY_ENV: "0.02"})  # ~3 s per stream

    async def scenario() -> list[list[str]]:
        async with httpx.AsyncClient(timeout=60) as client:
            firsts = [asyncio.Event() for _ in range(3)]
            streams = [asyncio.ensure_future(read_stream(client, server.url, completion(150, True), first))
                       for first in firsts]  # fmt: skip
            await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), timeout=60)
            server.process.send_signal(signal.SIGTERM)
            await wait_for_status(client, f"{server.url}/ready", 503)
            assert not any(s.done() for s in streams), "the streams ended before the drain could be observed"
            refused = await client.post(f"{server.url}/v1/completions", json=completion(4, False), headers=auth())
            assert_retryable_503(refused)
            assert (await client.get(f"{server.url}/health")).status_code == 200  # draining, not broken
            return await asyncio.gather(*streams)

    for payloads in asyncio.run(scenario()):
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert all("error" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server.exit_status(timeout=30) == 0


def test_requests_outliving_the_shutdown_timeout_are_ended_and_the_process_exits_0(start_server) -> None:
    timeout_s = 1.0
    server = start_server("--shutdown-timeout", str(timeout_s), env={STEP_DELAY_ENV: "0.05"})  # ~10 s per request

    async def scenario() -> tuple[list[str], httpx.Response, float]:
        async with httpx.AsyncClient(timeout=60) as client:
            first = asyncio.Event()
            stream = asyncio.ensure_future(read_stream(client, server.url, completion(200, True), first))
            plain = asyncio.ensure_future(client.post(f"{server.url}/v1/completions", json=completion(200, False),
                                                      headers=auth()))  # fmt: skip
            await asyncio.wait_for(first.wait(), timeout=60)
            await wait_for_running(client, server.url, 2)  # the plain request is being generated too
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            return await stream, await plain, signalled

    payloads, plain, signalled = asyncio.run(scenario())
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == "503" and "shut down" in error["message"]
    assert all(c["choices"][0]["finish_reason"] is None for c in map(json.loads, payloads[:-2]))
    assert_retryable_503(plain)
    assert server.exit_status(timeout=30) == 0
    assert time.monotonic() - signalled < timeout_s + 8  # the timeout, uvicorn's flush grace and some slack


def test_an_engine_failure_fails_the_request_and_exits_non_zero(start_server) -> None:
    server = start_server(env={FAIL_AFTER_ENV: "3"})
    response = httpx.post(f"{server.url}/v1/completions", json=completion(20, False), headers=auth(), timeout=60)
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "the engine failed while serving this request"
    assert server.exit_status(timeout=30) != 0
    assert "engine failed" in server.log()
