"""Prometheus metrics: the one module that imports prometheus_client. Names follow Prometheus
conventions (`smoothserve_` prefix, base units, `_total` counters) and carry a `model` label."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.llm_engine import StepTiming
from engine.scheduler import SchedulerStats

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024)
REJECTION_REASONS = ("requests", "tokens", "shutdown")
FINISH_REASONS = ("stop", "length", "abort")


class ServerMetrics:
    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        labels = ["model"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry).labels(model)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry).labels(model)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model)

        self.running = gauge("smoothserve_requests_running", "Sequences running in the engine")
        self.waiting = gauge("smoothserve_requests_waiting", "Sequences waiting to be scheduled")
        self.kv_usage = gauge("smoothserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use")
        self.prompt_tokens = counter("smoothserve_prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("smoothserve_generation_tokens", "Generated tokens of finished requests")
        self.preemptions = counter("smoothserve_preemptions", "Sequences preempted for KV cache space")
        self.prefix_queries = counter("smoothserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = counter("smoothserve_prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self._rejections = Counter("smoothserve_admission_rejections", "Requests refused at admission, by reason "
                                   "(requests or tokens: a queue limit; shutdown: draining)", ["model", "reason"],
                                   registry=self.registry)  # fmt: skip
        self.aborts = counter("smoothserve_aborted_requests", "Requests aborted (client gone or error)")
        self._finished = Counter("smoothserve_requests_finished", "Completions finished, by finish reason",
                                 ["model", "finish_reason"], registry=self.registry)  # fmt: skip
        self.ttft = histogram("smoothserve_time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS)
        self.inter_token = histogram("smoothserve_inter_token_latency_seconds", "Time between tokens", LATENCY_BUCKETS)
        self.e2e = histogram("smoothserve_e2e_request_latency_seconds", "Request latency", LATENCY_BUCKETS)
        self.queue_time = histogram("smoothserve_request_queue_time_seconds",
                                    "Time from admission to first being scheduled", LATENCY_BUCKETS)  # fmt: skip
        self.prompt_length = histogram("smoothserve_request_prompt_tokens", "Prompt length", TOKEN_BUCKETS)
        self.generation_length = histogram("smoothserve_request_generation_tokens", "Completion length", TOKEN_BUCKETS)
        self._http = Counter("smoothserve_http_responses", "HTTP responses, by route and status code",
                             ["model", "route", "status"], registry=self.registry)  # fmt: skip
        self._step_phase = Histogram("smoothserve_engine_step_phase_seconds",
                                     "Host time of each engine step phase: schedule, forward (issuing the model's GPU "
                                     "work), sample (with the wait for the GPU), postprocess", ["model", "phase"],
                                     buckets=STEP_BUCKETS, registry=self.registry)  # fmt: skip
        self._steps = Counter("smoothserve_engine_steps", "Engine steps that ran the model, by kind: "
                              "decode_graph (a replayed CUDA graph) or eager", ["model", "kind"],
                              registry=self.registry)  # fmt: skip
        self.step_tokens = counter("smoothserve_engine_step_tokens", "Tokens fed to the model, over all steps")
        self._last = SchedulerStats(0, 0, 0.0, 0, 0, 0)
        # Every label value from the start, so that dashboards see zeros rather than missing series.
        for reason in REJECTION_REASONS:
            self._rejections.labels(model, reason)
        for reason in FINISH_REASONS:
            self._finished.labels(model, reason)
        for phase in StepTiming.PHASES:
            self._step_phase.labels(model, phase)
        for kind in StepTiming.KINDS:
            self._steps.labels(model, kind)

    def finished(self, finish_reason: str) -> None:
        self._finished.labels(self.model, finish_reason).inc()

    def http_response(self, route: str, status: int) -> None:
        self._http.labels(self.model, route, str(status)).inc()

    def rejected(self, reason: str) -> None:
        self._rejections.labels(self.model, reason).inc()

    def update_engine(
        self, stats: SchedulerStats, queue_times: Sequence[float] = (), timing: StepTiming | None = None
    ) -> None:
        """Called by the engine thread after each step (prometheus_client is thread-safe); `timing` is
        the step's when it ran the model."""
        for seconds in queue_times:
            self.queue_time.observe(seconds)
        if timing is not None:
            self._steps.labels(self.model, timing.kind).inc()
            self.step_tokens.inc(timing.num_tokens)
            for phase, seconds in timing.phase_seconds().items():
                self._step_phase.labels(self.model, phase).observe(seconds)
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.preemptions.inc(stats.num_preemptions - self._last.num_preemptions)
        self.prefix_queries.inc(stats.prefix_cache_queries - self._last.prefix_cache_queries)
        self.prefix_hits.inc(stats.prefix_cache_hits - self._last.prefix_cache_hits)
        self._last = stats

    def render(self) -> bytes:
        return generate_latest(self.registry)
