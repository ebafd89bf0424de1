"""The HTTP server on a tiny model, through a real uvicorn on 127.0.0.1: the OpenAI client, errors in
the OpenAI envelope, auth, disconnects, admission control, the OpenAPI schema, request logs and metrics.
(`smoothserve serve` as a process, with its shutdown and failure exits: test_server_lifecycle.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time

import httpx
import pytest

from engine.config import CacheConfig, EngineConfig, ModelConfig, ServerConfig
from server.app import create_app
from server.fault_injection import STEP_DELAY_ENV, install_faults
from server.main import build_state
from server.protocol import CompletionRequest, ErrorBody
from tests.conftest import free_port

API_KEY = "test-key-123"


class RunningServer:
    def __init__(self, model_dir, num_cpu_blocks: int = 64, **server_kwargs) -> None:
        import uvicorn

        self.port = free_port()
        config = EngineConfig(
            model=ModelConfig(model=str(model_dir), device="cpu", dtype="float32", max_model_len=256),
            cache=CacheConfig(num_cpu_blocks=num_cpu_blocks),
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


def scrape(server: RunningServer) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    text = httpx.get(f"{server.url}/metrics", headers=headers(), timeout=30).text
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in text.splitlines()
                                                   if line and not line.startswith("#"))}  # fmt: skip


def test_metrics_after_traffic_count_what_was_served(trained_outlier_model_dir) -> None:
    # 8 blocks of 16 tokens: six concurrent 60-token sequences cannot all fit, so some are preempted.
    running = RunningServer(trained_outlier_model_dir, num_cpu_blocks=8)
    try:
        model = '{model="tiny"}'
        before = scrape(running)

        async def traffic() -> list[dict]:
            async with httpx.AsyncClient(timeout=120) as client:
                body = {"model": "tiny", "max_tokens": 40, "ignore_eos": True}
                prompts = [[7 + i] * 20 for i in range(6)]
                return [r.json() for r in await asyncio.gather(*(client.post(
                    f"{running.url}/v1/completions", json={**body, "prompt": p}, headers=headers())
                    for p in prompts))]  # fmt: skip

        replies = asyncio.run(traffic())
        shared = {"model": "tiny", "prompt": "MENENIUS: " * 12, "max_tokens": 4, "ignore_eos": True}
        replies += [post(running, shared).json(), post(running, shared).json()]  # the second one hits the cache
        assert post(running, {"model": "tiny", "prompt": ""}).status_code == 400
        wrong_key = httpx.post(f"{running.url}/v1/completions", headers=headers("wrong"), json=shared)
        assert wrong_key.status_code == 401
        assert httpx.get(f"{running.url}/no/such/route", headers=headers()).status_code == 404
        running.assert_idle()
        after = scrape(running)

        def delta(name: str) -> float:
            return after[name] - before.get(name, 0.0)

        prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in replies)
        completion_tokens = sum(r["usage"]["completion_tokens"] for r in replies)
        assert completion_tokens == 6 * 40 + 2 * 4
        assert delta(f"smoothserve_prompt_tokens_total{model}") == prompt_tokens
        assert delta(f"smoothserve_generation_tokens_total{model}") == completion_tokens
        assert delta('smoothserve_requests_finished_total{finish_reason="length",model="tiny"}') == 8
        assert delta(f"smoothserve_preemptions_total{model}") > 0
        assert delta(f"smoothserve_prefix_cache_queries_total{model}") >= prompt_tokens
        assert delta(f"smoothserve_prefix_cache_hits_total{model}") >= 16  # a block of the repeated prompt
        for histogram in (
            "time_to_first_token_seconds",
            "inter_token_latency_seconds",
            "e2e_request_latency_seconds",
            "request_queue_time_seconds",
            "request_prompt_tokens",
            "request_generation_tokens",
        ):
            assert delta(f"smoothserve_{histogram}_count{model}") == 8, histogram
            assert after[f'smoothserve_{histogram}_bucket{{le="+Inf",model="tiny"}}'] == after[
                f"smoothserve_{histogram}_count{model}"]  # fmt: skip
        assert delta(f"smoothserve_request_prompt_tokens_sum{model}") == prompt_tokens
        assert delta(f"smoothserve_request_generation_tokens_sum{model}") == completion_tokens
        ttft, e2e = delta(f"smoothserve_time_to_first_token_seconds_sum{model}"), delta(
            f"smoothserve_e2e_request_latency_seconds_sum{model}")  # fmt: skip
        assert 0 < ttft < e2e < 8 * 120
        assert 0 < delta(f"smoothserve_inter_token_latency_seconds_sum{model}") < e2e
        assert 0 <= delta(f"smoothserve_request_queue_time_seconds_sum{model}") < ttft
        # Engine steps: every token fed to the model (prompts, less prefix-cache hits and plus recomputation
        # after preemption, and all but the last generated token) in steps that are all eager on the CPU,
        # each timed in every phase.
        steps = 'smoothserve_engine_steps_total{{kind="{}",model="tiny"}}'
        num_steps = delta(steps.format("eager"))
        assert num_steps >= completion_tokens / 8 and delta(steps.format("decode_graph")) == 0
        fed = delta(f"smoothserve_engine_step_tokens_total{model}")
        assert fed >= completion_tokens - 8 + prompt_tokens - delta(f"smoothserve_prefix_cache_hits_total{model}")
        phases = [f'smoothserve_engine_step_phase_seconds_{{}}{{{{model="tiny",phase="{p}"}}}}'
                  for p in ("schedule", "forward", "sample", "postprocess")]  # fmt: skip
        for phase in phases:
            assert delta(phase.format("count")) == num_steps
        assert delta(phases[1].format("sum")) > 0  # the CPU forward is the bulk of a step
        # Idle again: the gauges say so.
        for gauge in ("requests_running", "requests_waiting", "kv_cache_usage_ratio"):
            assert after[f"smoothserve_{gauge}{model}"] == 0.0, gauge
        for reason in ("requests", "tokens", "shutdown"):
            assert after[f'smoothserve_admission_rejections_total{{model="tiny",reason="{reason}"}}'] == 0
        assert after[f"smoothserve_aborted_requests_total{model}"] == 0
        # Every response is counted by route and status, the guard's 401 included; unknown paths as "other".
        responses = 'smoothserve_http_responses_total{{model="tiny",route="{}",status="{}"}}'
        assert delta(responses.format("/v1/completions", 200)) == 8
        assert delta(responses.format("/v1/completions", 400)) == 1
        assert delta(responses.format("/v1/completions", 401)) == 1
        assert delta(responses.format("other", 404)) == 1
        assert not any("/no/such/route" in name for name in after)
        assert all(name.startswith("smoothserve_") and 'model="tiny"' in name for name in after)
    finally:
        running.stop()


def test_every_finished_request_logs_one_line_without_the_api_key(server, caplog) -> None:
    caplog.set_level(logging.INFO, logger="smoothserve.server")

    def request_lines() -> list[dict]:
        return [json.loads(r.getMessage()) for r in caplog.records
                if r.name == "smoothserve.server" and r.getMessage().startswith("{")]  # fmt: skip

    assert httpx.post(f"{server.url}/v1/completions", headers=headers("wrong-" + API_KEY),
                      json={"model": "tiny", "prompt": "x"}).status_code == 401  # fmt: skip
    assert post(server, {"model": "tiny", "prompt": ""}).status_code == 400
    assert request_lines() == []  # refused requests were never admitted
    plain = post(server, {"model": "tiny", "prompt": ["To be", "or not"], "n": 2, "max_tokens": 3,
                          "ignore_eos": True}).json()  # fmt: skip
    streamed = {"model": "tiny", "prompt": "KING:", "max_tokens": 4, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=headers(), json=streamed,
                      timeout=60) as response:  # fmt: skip
        lines = response.iter_lines()
        streamed_id = json.loads(next(lines).removeprefix("data: "))["id"]
        list(lines)
    deadline = time.time() + 5  # a stream logs just after its [DONE]
    while streamed_id not in {line["id"] for line in request_lines()} and time.time() < deadline:
        time.sleep(0.05)
    by_id = {line["id"]: line for line in request_lines()}
    assert [line["id"] for line in request_lines()].count(plain["id"]) == 1
    assert [line["id"] for line in request_lines()].count(streamed_id) == 1
    assert by_id[plain["id"]]["completion_tokens"] == plain["usage"]["completion_tokens"] == 12
    assert by_id[plain["id"]]["finish_reasons"] == [c["finish_reason"] for c in plain["choices"]]
    assert by_id[plain["id"]]["prompt_tokens"] * 2 == plain["usage"]["prompt_tokens"]  # usage counts them n = 2 times
    assert by_id[streamed_id]["completion_tokens"] == 4 and by_id[streamed_id]["finish_reasons"] == ["length"]
    for line in (by_id[plain["id"]], by_id[streamed_id]):
        assert set(line) == {"id", "prompt_tokens", "completion_tokens", "latency_s", "finish_reasons"}
        assert line["prompt_tokens"] > 0 and 0 < line["latency_s"] < 60
    assert API_KEY not in caplog.text


def test_admission_is_refused_over_max_queued_tokens(trained_outlier_model_dir) -> None:
    running = RunningServer(trained_outlier_model_dir, max_queued_tokens=40)
    install_faults(running.state.client.engine, {STEP_DELAY_ENV: "0.02"})  # the long request stays queued
    try:
        long_request = {"model": "tiny", "prompt": [5] * 30, "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{running.url}/v1/completions", json=long_request, headers=headers(),
                          timeout=60) as stream:  # fmt: skip
            lines = stream.iter_lines()
            next(lines)  # 30 prompt tokens queued for the next ~2 s
            refused = post(running, {"model": "tiny", "prompt": [5] * 11, "max_tokens": 1})
            assert_error(refused, 429, "prompt tokens")
            assert refused.headers["retry-after"] == "1"
            assert post(running, {"model": "tiny", "prompt": [5] * 10, "max_tokens": 1}).status_code == 200
            list(lines)
        assert post(running, {"model": "tiny", "prompt": [5] * 11, "max_tokens": 1}).status_code == 200
        running.assert_idle()
        assert scrape(running)['smoothserve_admission_rejections_total{model="tiny",reason="tokens"}'] == 1
    finally:
        running.stop()


def test_a_thousand_disconnects_leave_the_server_idle_and_serving(trained_outlier_model_dir) -> None:
    running = RunningServer(trained_outlier_model_dir, max_queued_requests=1024)
    body = {"model": "tiny", "prompt": "KING RICHARD:\n", "max_tokens": 64, "ignore_eos": True}

    async def drop(client: httpx.AsyncClient, index: int, slots: asyncio.Semaphore) -> None:
        async with slots:
            if index % 2:  # streaming: read the first chunk, then close the connection
                async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                    async for _ in response.aiter_lines():
                        break
            else:  # non-streaming: give up before the reply (after 10 to 100 ms), mid-queue or mid-generation
                with contextlib.suppress(httpx.TimeoutException):
                    await client.post("/v1/completions", json=body, timeout=0.01 * (1 + index % 10))

    async def thousand() -> None:
        slots = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=running.url, headers=headers(), timeout=60) as client:
            await asyncio.gather(*(drop(client, i, slots) for i in range(1000)))

    try:
        asyncio.run(thousand())
        running.assert_idle()
        after = scrape(running)
        assert after['smoothserve_aborted_requests_total{model="tiny"}'] >= 900
        for gauge in ("requests_running", "requests_waiting", "kv_cache_usage_ratio"):
            assert after[f'smoothserve_{gauge}{{model="tiny"}}'] == 0.0, gauge
        assert running.state.client.num_requests == running.state.client.num_queued_tokens == 0
        served = post(running, {"model": "tiny", "prompt": "still serving", "max_tokens": 3})
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 3
    finally:
        running.stop()


def test_the_openapi_schema_documents_the_completions_api(server) -> None:
    assert httpx.get(f"{server.url}/openapi.json").status_code == 401  # guarded like every route but probes
    assert httpx.get(f"{server.url}/docs").status_code == 401
    assert httpx.get(f"{server.url}/docs", headers=headers()).status_code == 200
    schema = httpx.get(f"{server.url}/openapi.json", headers=headers()).json()
    operation = schema["paths"]["/v1/completions"]["post"]
    components = schema["components"]["schemas"]
    request_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = components[request_ref.rsplit("/", 1)[1]]
    assert set(request["properties"]) == set(CompletionRequest.model_fields)
    assert set(request["required"]) == {"model", "prompt"} and request["additionalProperties"] is False
    assert request["properties"]["n"]["maximum"] == 16 and request["properties"]["max_tokens"]["minimum"] == 1
    responses = operation["responses"]
    assert set(responses) == {"200", "400", "401", "404", "413", "429", "500", "503"}
    assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    for status in ("400", "401", "404", "413", "429", "500", "503"):
        assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert set(components["ErrorBody"]["properties"]) == set(ErrorBody.model_fields)
    assert "422" not in json.dumps(schema["paths"])  # invalid input is a 400 here, not FastAPI's 422
    assert {"/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health", "/ready", "/metrics"} <= set(
        schema["paths"])  # fmt: skip


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
