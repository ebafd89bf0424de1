"""The benchmark's printed report and its JSON file."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from pathlib import Path

from engine.bench.metrics import PERCENTILES, LoadSummary
from engine.bench.runner import BenchConfig, BenchResult
from engine.table import align_columns

JSON_FILE = "bench.json"
LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("inter-token", "itl_ms"), ("end-to-end", "e2e_ms"))


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def format_load(summary: LoadSummary, config: BenchConfig) -> str:
    arrivals = "all at once" if math.isinf(summary.request_rate) else f"{config.arrivals}, seed {config.seed}"
    lines = [
        f"request rate {rate_label(summary.request_rate)} req/s ({arrivals}): {summary.num_requests} sent, "
        f"{summary.completed} completed, {summary.failed} failed in {summary.duration_s:.2f} s",
        f"  throughput: {summary.request_throughput:.2f} req/s, {summary.output_token_throughput:.1f} output tok/s, "
        f"{summary.total_token_throughput:.1f} total tok/s",
    ]
    if summary.goodput is not None:
        lines.append(f"  goodput: {summary.goodput:.2f} req/s within the SLO ({slo_text(config)})")
    header = ["latency (ms)", "mean", *(f"p{p}" for p in PERCENTILES), "max"]
    rows = [[name, *(f"{getattr(summary, key)[k]:.1f}" for k in ("mean", *(f"p{p}" for p in PERCENTILES), "max"))]
            for name, key in LATENCIES if getattr(summary, key)]  # fmt: skip
    lines.extend("  " + line for line in align_columns([header, *rows], separator="  "))
    for message, count in summary.errors.items():
        lines.append(f"  failed x{count}: {message}")
    return "\n".join(lines)


def slo_text(config: BenchConfig) -> str:
    bounds = (("TTFT", config.slo.ttft_ms), ("TPOT", config.slo.tpot_ms), ("end-to-end", config.slo.e2e_ms))
    return ", ".join(f"{name} <= {bound:g} ms" for name, bound in bounds if bound is not None)


def _jsonable(value: object) -> object:
    """JSON has no infinity: rates of inf are written as the string "inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(result: BenchResult, config: BenchConfig, out_dir: Path) -> Path:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "api_key"}
    document = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": result.model,
        "config": settings,
        "loads": [
            {**dataclasses.asdict(load.summary), "requests": [
                {**dataclasses.asdict(r), "tpot": r.tpot} for r in load.records]}
            for load in result.loads
        ],
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / JSON_FILE
    path.write_text(json.dumps(_jsonable(document), indent=2) + "\n")
    return path
