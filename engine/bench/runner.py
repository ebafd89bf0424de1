"""Run a benchmark: connect, make the prompts, warm up, then one load per request rate."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from engine.bench.arrivals import Arrivals, arrival_times
from engine.bench.client import send_request
from engine.bench.metrics import SLO, LoadSummary, summarize
from engine.bench.records import RequestRecord
from engine.bench.workload import file_prompts, random_prompts
from engine.errors import BenchmarkError


@dataclass(frozen=True)
class BenchConfig:
    url: str
    dataset: str = "random"  # "random" or a prompt file
    num_prompts: int = 100  # per request rate
    input_len: int | None = 512  # None: file prompts as they are
    output_len: int = 128
    request_rates: tuple[float, ...] = (math.inf,)
    arrivals: Arrivals = "poisson"
    max_concurrency: int | None = None
    num_warmups: int = 2
    seed: int = 0
    slo: SLO = field(default_factory=SLO)
    model: str | None = None  # None: the one the server lists
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 600.0
    server_metrics: bool = False  # scrape the server's Prometheus /metrics before and after each load


@dataclass(frozen=True)
class LoadResult:
    summary: LoadSummary
    records: list[RequestRecord]
    # The server's /metrics text just before and just after this load (BenchConfig.server_metrics): counters
    # that differ between the two belong to this load alone.
    metrics_before: str | None = None
    metrics_after: str | None = None


@dataclass(frozen=True)
class BenchResult:
    model: str
    loads: list[LoadResult]


def _headers(config: BenchConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def _served_model(client: httpx.Client, config: BenchConfig) -> str:
    try:
        response = client.get("/v1/models")
    except httpx.HTTPError as error:
        raise BenchmarkError(
            f"cannot reach a server at {config.url} ({type(error).__name__}); is `smoothserve serve` running?"
        ) from None
    if response.status_code == 401:
        raise BenchmarkError(f"{config.url} wants an API key: pass --api-key or set SMOOTHSERVE_API_KEY")
    if response.status_code != 200:
        raise BenchmarkError(f"{config.url}/v1/models answered HTTP {response.status_code}")
    models = [m["id"] for m in response.json().get("data", [])]
    if config.model is not None:
        return config.model
    if not models:
        raise BenchmarkError(f"{config.url} serves no model")
    return models[0]


@dataclass(frozen=True)
class Prompts:
    """The warm-up's prompts and each load's own: a load never resends what the server has already seen,
    whose blocks its prefix cache may still hold (a later rate would then skip most of its prefill)."""

    warmup: list[list[int]]
    loads: list[list[list[int]]]  # one list per request rate, in order


def make_prompts(client: httpx.Client, config: BenchConfig) -> Prompts:
    """`random`: fresh windows for the warm-up and for every load; a file: read on in order, wrapping
    around only when the file has fewer prompts than the whole run sends."""
    total = config.num_warmups + config.num_prompts * len(config.request_rates)
    if config.dataset == "random":
        if config.input_len is None:
            raise BenchmarkError("the random data set needs --input-len")
        every = random_prompts(client, total, config.input_len, config.seed)
    else:
        every = file_prompts(client, Path(config.dataset), total, config.input_len)
    warmup, rest, n = every[: config.num_warmups], every[config.num_warmups :], config.num_prompts
    return Prompts(warmup, [rest[i * n : (i + 1) * n] for i in range(len(config.request_rates))])


def _payload(config: BenchConfig, model: str, prompt: list[int]) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": config.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


async def _run_load(
    client: httpx.AsyncClient, config: BenchConfig, model: str, prompts: list[list[int]], rate: float, progress: bool
) -> LoadResult:
    url, headers = f"{config.url}/v1/completions", _headers(config)
    send_at = arrival_times(len(prompts), rate, config.arrivals, config.seed)
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    # Scraped before the clock starts: the scrape must neither delay the first sends nor count in the duration.
    before = await _scrape_metrics(client, config) if config.server_metrics else None
    bar = tqdm(total=len(prompts), desc=f"rate {rate:g}/s", unit="req", disable=not progress)
    started = time.perf_counter()

    async def one(prompt: list[int], at: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
        async with limit or contextlib.nullcontext():  # waits for a free slot under --max-concurrency
            record = await send_request(client, url, _payload(config, model, prompt), headers,
                                        sent_at=time.perf_counter() - started)  # fmt: skip
        bar.update()
        return record

    records = list(await asyncio.gather(*(one(p, at) for p, at in zip(prompts, send_at, strict=True))))
    duration = time.perf_counter() - started
    after = await _scrape_metrics(client, config) if config.server_metrics else None
    bar.close()
    return LoadResult(summarize(records, rate, duration, config.slo), records, before, after)


async def _scrape_metrics(client: httpx.AsyncClient, config: BenchConfig) -> str:
    try:
        response = await client.get(f"{config.url}/metrics", headers=_headers(config))
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise BenchmarkError(f"--server-metrics: cannot read {config.url}/metrics ({type(error).__name__})") from None
    return response.text


async def _run_all(config: BenchConfig, model: str, prompts: Prompts, progress: bool) -> list[LoadResult]:
    limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=config.timeout_s, limits=limits) as client:
        url, headers = f"{config.url}/v1/completions", _headers(config)
        for prompt in prompts.warmup:  # first compiles, allocations, caches: not measured
            warm = await send_request(client, url, _payload(config, model, prompt), headers, sent_at=0.0)
            if not warm.ok:
                raise BenchmarkError(f"the warm-up request failed: {warm.error}")
        return [
            await _run_load(client, config, model, load_prompts, rate, progress)
            for load_prompts, rate in zip(prompts.loads, config.request_rates, strict=True)
        ]


def run_benchmark(config: BenchConfig, progress: bool = True) -> BenchResult:
    with httpx.Client(base_url=config.url, headers=_headers(config), timeout=config.timeout_s) as client:
        model = _served_model(client, config)
        try:
            prompts = make_prompts(client, config)
        except httpx.HTTPStatusError as error:
            raise BenchmarkError(f"{config.url}/tokenize answered HTTP {error.response.status_code}") from None
    return BenchResult(model, asyncio.run(_run_all(config, model, prompts, progress)))
