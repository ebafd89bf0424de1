"""Summaries of one load: latency percentiles, throughput, and goodput under an SLO."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.bench.records import RequestRecord

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class SLO:
    """A request is good when it meets every bound given (milliseconds; None: no bound)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def met_by(self, record: RequestRecord) -> bool:
        bounds = ((self.ttft_ms, record.ttft), (self.tpot_ms, record.tpot), (self.e2e_ms, record.e2e))
        return record.ok and all(
            bound is None or (value is not None and value * 1000 <= bound) for bound, value in bounds
        )


def distribution_ms(seconds: list[float]) -> dict[str, float]:
    """mean, p50 ... p99 and max of a list of durations, in milliseconds (empty: {})."""
    if not seconds:
        return {}
    values = np.asarray(seconds, dtype=np.float64) * 1000
    stats = {"mean": float(values.mean())}
    stats.update({f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES})
    stats["max"] = float(values.max())
    return stats


@dataclass(frozen=True)
class LoadSummary:
    request_rate: float  # requests per second asked for (inf: all at once)
    num_requests: int  # sent
    completed: int
    failed: int
    duration_s: float  # from the first send to the last response
    request_throughput: float  # completed requests per second
    output_token_throughput: float  # generated tokens per second
    total_token_throughput: float  # prompt and generated tokens per second
    goodput: float | None  # requests per second that met the SLO (None: no SLO given)
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    errors: dict[str, int] = field(default_factory=dict)  # failure message -> count
    # Whether the server kept up, free of the load's ramp and tail (which `request_throughput` includes, so a
    # short load at a rate the server sustains still reads below that rate): requests per second between the
    # first and the last send, and completions per second between the first and the last completion. A server
    # that keeps up completes at the rate it is sent to; one that cannot completes at its own pace.
    send_rate: float | None = None  # None: fewer than 2 requests (or all sent at once)
    completion_rate: float | None = None  # None: fewer than 2 completed


def summarize(records: list[RequestRecord], request_rate: float, duration_s: float, slo: SLO) -> LoadSummary:
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for record in records:
        if not record.ok:
            errors[record.error or "unknown"] = errors.get(record.error or "unknown", 0) + 1
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    per_second = 1.0 / duration_s if duration_s > 0 else 0.0
    return LoadSummary(
        request_rate=request_rate,
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        request_throughput=len(ok) * per_second,
        output_token_throughput=output_tokens * per_second,
        total_token_throughput=(prompt_tokens + output_tokens) * per_second,
        goodput=sum(slo.met_by(r) for r in ok) * per_second if slo.is_set else None,
        ttft_ms=distribution_ms([r.ttft for r in ok if r.ttft is not None]),
        tpot_ms=distribution_ms([r.tpot for r in ok if r.tpot is not None]),
        itl_ms=distribution_ms([gap for r in ok for gap in r.itl]),
        e2e_ms=distribution_ms([r.e2e for r in ok if r.e2e is not None]),
        errors=errors,
        send_rate=_rate([r.sent_at for r in records]),
        completion_rate=_rate([r.sent_at + r.e2e for r in ok if r.e2e is not None]),
    )


def _rate(times: list[float]) -> float | None:
    """Events per second between the first and the last of `times` (None: fewer than 2, or all at once)."""
    if len(times) < 2 or max(times) <= min(times):
        return None
    return (len(times) - 1) / (max(times) - min(times))
