"""The HTTP server on a tiny model, through a real uvicorn on 127.0.0.1: the OpenAI client, errors in
the OpenAI envelope, auth, disconnects, admission control and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest

from engine.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
from server.app import create_app
from server.main import build_state

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    def __init__(self, model_dir, **server_kwargs) -> None:
        import uvicorn

        self.port = free_port()
        config = EngineConfig(
            model=ModelConfig(model=str(model_dir), device="cpu", dtype="float32", max_model_len=256),
            cache=CacheConfig(num_cpu_blocks=64),
            server=ServerConfig(port=self.port, api_key=API_KEY, served_model_name="tiny", **server_kwargs),
        )
        self.state = build_state(config)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def assert_idle(self) -> None:
        """Every request gone from the engine and every KV block free (within a few engine steps)."""
        deadline = time.time() + 5
        engine = self.state.client.engine
        while time.time() < deadline:
            blocks = engine.scheduler.blocks
            if not engine.has_unfinished_requests() and blocks.num_free_blocks == blocks.num_blocks:
                stats = engine.stats()
                assert stats.num_running == stats.num_waiting == 0
                return
            time.sleep(0.05)
        raise AssertionError("requests or KV blocks left behind")


@pytest.fixture(scope="module")
def server(trained_outlier_model_dir):
    running = RunningServer(trained_outlier_model_dir, max_queued_requests=8)
    yield running
    running.stop()


def headers(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(server: RunningServer, body: object, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{server.url}/v1/completions", content=content,
                      headers={**headers(), "content-type": "application/json"}, timeout=60, **kwargs)  # fmt: skip


def assert_error(response: httpx.Response, status: int, text: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert text in error["message"]
    assert "Traceback" not in error["message"] and "/" not in error["message"].split(" ")[0]


def test_openai_client_plain_and_streaming(server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
    plain = client.completions.create(model="tiny", prompt="KING RICHARD:\n", max_tokens=10, temperature=0)
    streamed = client.completions.create(model="tiny", prompt="KING RICHARD:\n", max_tokens=10, temperature=0,
                                         stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(streamed)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text and text
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 10 and plain.usage.total_tokens == plain.usage.prompt_tokens + 10
    assert chunks[-1].usage.completion_tokens == 10
    assert [m.id for m in client.models.list().data] == ["tiny"]
    server.assert_idle()


def test_several_prompts_n_echo_and_logprobs(server) -> None:
    response = post(server, {"model": "tiny", "prompt": ["To be", "or not"], "n": 2, "max_tokens": 3,
                             "echo": True, "logprobs": 2, "seed": 3})  # fmt: skip
    assert response.status_code == 200
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"].startswith("To be") and choices[2]["text"].startswith("or not")
    assert all(len(c["logprobs"]["tokens"]) == 3 and len(c["logprobs"]["top_logprobs"][0]) <= 2 for c in choices)
    assert response.json()["usage"]["completion_tokens"] == 12
    server.assert_idle()


@pytest.mark.parametrize(
    "body, status, text",
    [
        ({"model": "tiny", "prompt": "x", "n": 10**6}, 400, "n"),
        ({"model": "tiny", "prompt": "x", "logprobs": 10**9}, 400, "logprobs"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 2**31}, 400, "context length"),
        ({"model": "tiny", "prompt": ""}, 400, "empty"),
        ({"model": "tiny", "prompt": []}, 400, "empty"),
        ({"model": "tiny", "prompt": [[]]}, 400, "empty"),
        ({"model": "tiny", "prompt": [-1]}, 400, "prompt"),
        ({"model": "tiny", "prompt": [10**6]}, 400, "vocabulary"),
        ({"model": "tiny", "prompt": "word " * 300, "max_tokens": 4}, 400, "context length"),
        ({"model": "tiny", "prompt": "x", "stop": ["a"] * 10**5}, 400, "stop"),
        ({"model": "tiny", "prompt": "x", "unknown_field": 1}, 400, "unknown_field"),
        ({"model": "other", "prompt": "x"}, 404, "does not exist"),
        ("{not json", 400, ""),
        ("[1, 2, 3]", 400, ""),
        ('{"model": "tiny", "prompt": "\\ud800"}', 400, "surrogate"),
    ],
)
def test_bad_requests_get_an_openai_error_and_change_nothing(server, body, status: int, text: str) -> None:
    assert_error(post(server, body), status, text)
    server.assert_idle()
    assert post(server, {"model": "tiny", "prompt": "still serving", "max_tokens": 2}).status_code == 200


def test_a_huge_body_is_refused(server) -> None:
    response = post(server, b'{"model": "tiny", "prompt": "' + b"a" * (50 * 1024**2) + b'"}')
    assert_error(response, 413)
    server.assert_idle()


@pytest.mark.parametrize("path", ["/v1/completions", "//v1/completions", "/V1/completions", "/%2Fv1/completions"])
@pytest.mark.parametrize("key", [None, "wrong", API_KEY.upper()])
def test_auth_is_required_on_every_guarded_path(server, path: str, key: str | None) -> None:
    auth = headers(key) if key else {}
    response = httpx.post(f"{server.url}{path}", json={"model": "tiny", "prompt": "x"}, headers=auth, timeout=30)
    assert_error(response, 401)
    assert httpx.get(f"{server.url}/metrics", headers=auth).status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_disconnects_abort_requests_and_free_their_blocks(server) -> None:
    async def hang_up(stream: bool) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": "tiny", "prompt": "KING RICHARD:\n", "max_tokens": 200, "stream": stream,
                    "ignore_eos": True}  # fmt: skip
            if stream:
                async with client.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers()) as r:
                    async for _ in r.aiter_lines():
                        break  # the first chunk, then gone
            else:  # gone before the reply (most of these time out mid-generation)
                with contextlib.suppress(httpx.ReadTimeout):
                    await client.post(f"{server.url}/v1/completions", json=body, headers=headers(), timeout=0.05)

    async def many() -> None:
        await asyncio.gather(*(hang_up(stream=i % 2 == 0) for i in range(20)))

    aborted_before = server.state.metrics.aborts._value.get()
    asyncio.run(many())
    server.assert_idle()
    assert server.state.metrics.aborts._value.get() > aborted_before
    assert post(server, {"model": "tiny", "prompt": "still serving", "max_tokens": 2}).status_code == 200


def test_a_burst_beyond_the_queue_limit_gets_429_with_retry_after(server) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "tiny", "prompt": "To be", "max_tokens": 30, "ignore_eos": True}
            return await asyncio.gather(*(client.post(f"{server.url}/v1/completions", json=body, headers=headers())
                                          for _ in range(80)))  # fmt: skip

    responses = asyncio.run(burst())
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 429} and 429 in statuses and 200 in statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1"
    assert_error(rejected, 429)
    server.assert_idle()


def test_metrics_after_traffic(server) -> None:
    assert post(server, {"model": "tiny", "prompt": "MENENIUS:\n", "max_tokens": 4}).status_code == 200
    text = httpx.get(f"{server.url}/metrics", headers=headers()).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)

    def value(prefix: str) -> float:
        return sum(v for k, v in samples.items() if k.startswith(prefix))

    assert value('smoothserve_prompt_tokens_total{model="tiny"}') > 0
    assert value('smoothserve_generation_tokens_total{model="tiny"}') >= 4
    assert value('smoothserve_requests_finished_total{finish_reason="length"') >= 1
    assert value('smoothserve_time_to_first_token_seconds_count{model="tiny"}') >= 1
    assert value('smoothserve_e2e_request_latency_seconds_count{model="tiny"}') >= 1
    assert value('smoothserve_request_prompt_tokens_sum{model="tiny"}') > 0
    assert value('smoothserve_prefix_cache_queries_total{model="tiny"}') > 0
    assert value('smoothserve_kv_cache_usage_ratio{model="tiny"}') >= 0.0
    assert 'smoothserve_requests_running{model="tiny"}' in samples
    assert 'smoothserve_admission_rejections_total{model="tiny"}' in samples


def test_an_engine_failure_gives_500_and_unhealthy(trained_outlier_model_dir) -> None:
    running = RunningServer(trained_outlier_model_dir)
    try:
        runner = running.state.client.engine.runner

        def broken_forward(*args, **kwargs):
            raise RuntimeError("injected failure in the model forward")

        runner.execute = broken_forward
        response = post(running, {"model": "tiny", "prompt": "To be", "max_tokens": 3})
        assert_error(response, 500, "engine failed")
        assert "injected" not in response.text  # internals stay in the server log
        streamed = httpx.post(f"{running.url}/v1/completions", headers=headers(), timeout=30,
                              json={"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True})  # fmt: skip
        assert streamed.status_code in (200, 503)
        assert httpx.get(f"{running.url}/health").status_code == 503
        assert httpx.get(f"{running.url}/ready").status_code == 503
    finally:
        running.stop()
