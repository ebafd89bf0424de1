"""`smoothserve bench`: seeded arrivals, the summary's arithmetic, and a run against a live tiny server."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import sys

import pytest
import torch

from engine.bench.arrivals import arrival_times, parse_rates
from engine.bench.metrics import PERCENTILES, SLO, summarize
from engine.bench.plots import MISSING_MATPLOTLIB, PLOT_FILES
from engine.bench.records import RequestRecord
from engine.cli import main
from tests.test_server import API_KEY, RunningServer, free_port

INPUT_LEN, OUTPUT_LEN, NUM_PROMPTS = 24, 5, 6


def test_poisson_arrivals_are_seeded_with_mean_gap_one_over_rate() -> None:
    times = arrival_times(4000, rate=8.0, arrivals="poisson", seed=3)
    assert times == arrival_times(4000, rate=8.0, arrivals="poisson", seed=3)
    assert times != arrival_times(4000, rate=8.0, arrivals="poisson", seed=4)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 0 and min(gaps) >= 0
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 8, rel=0.05)
    assert len(set(gaps)) > 3000  # exponential gaps, not a fixed step


def test_fixed_and_infinite_rates() -> None:
    assert arrival_times(4, rate=2.0, arrivals="fixed", seed=0) == [0.0, 0.5, 1.0, 1.5]
    assert arrival_times(3, rate=math.inf, arrivals="poisson", seed=0) == [0.0, 0.0, 0.0]
    assert parse_rates("1, 4,16,inf") == [1.0, 4.0, 16.0, math.inf]
    for bad in ("0", "-1", "fast", "nan"):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_summary_counts_failures_and_goodput_under_the_slo() -> None:
    def ok(ttft: float, e2e: float) -> RequestRecord:
        return RequestRecord(True, prompt_tokens=10, output_tokens=5, ttft=ttft, e2e=e2e, itl=[0.01] * 4)

    records = [ok(0.1, 0.5), ok(0.2, 0.3), ok(0.4, 0.6), RequestRecord(False, 10, error="HTTP 429: full")]
    summary = summarize(records, request_rate=4.0, duration_s=2.0, slo=SLO(ttft_ms=250, tpot_ms=50))
    assert (summary.num_requests, summary.completed, summary.failed) == (4, 3, 1)
    assert summary.errors == {"HTTP 429: full": 1}
    # TPOTs: 100, 25, 50 ms; TTFT <= 250 ms and TPOT <= 50 ms holds for the second only
    assert summary.goodput == pytest.approx(1 / 2.0)
    assert summary.request_throughput == pytest.approx(3 / 2.0)
    assert summary.output_token_throughput == pytest.approx(15 / 2.0)
    assert summary.total_token_throughput == pytest.approx(45 / 2.0)
    assert summary.ttft_ms["mean"] == pytest.approx(700 / 3) and summary.ttft_ms["max"] == pytest.approx(400)
    assert summarize(records, 4.0, 2.0, SLO()).goodput is None


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls gain nothing from threads, and lose much on a busy machine
    running = RunningServer(tiny_model_dir)
    yield running
    running.stop()
    torch.set_num_threads(threads)


def run_bench(capsys, server, out, *args: str) -> tuple[int, str, str]:
    """The bench CLI with small defaults; later flags in `args` override them."""
    code = main(["bench", "--url", server.url, "--api-key", API_KEY, "--input-len", str(INPUT_LEN),
                 "--output-len", str(OUTPUT_LEN), "--num-prompts", str(NUM_PROMPTS), "--num-warmups", "1",
                 "--out", str(out), *args])  # fmt: skip
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def bench_run(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    stdout = io.StringIO()  # module scope has no capsys: capture by hand
    with contextlib.redirect_stdout(stdout):
        code = main(["bench", "--url", server.url, "--api-key", API_KEY, "--input-len", str(INPUT_LEN),
                     "--output-len", str(OUTPUT_LEN), "--num-prompts", str(NUM_PROMPTS), "--num-warmups", "1",
                     "--request-rate", "40,inf", "--slo-ttft-ms", "60000", "--server-metrics",
                     "--out", str(out)])  # fmt: skip
    assert code == 0
    return out, stdout.getvalue(), json.loads((out / "bench.json").read_text())


def test_bench_sends_every_request_and_none_fails(bench_run) -> None:
    _, stdout, document = bench_run
    assert [load["request_rate"] for load in document["loads"]] == [40.0, "inf"]
    for load in document["loads"]:
        assert (load["num_requests"], load["completed"], load["failed"]) == (NUM_PROMPTS, NUM_PROMPTS, 0)
        assert load["goodput"] == pytest.approx(load["request_throughput"])  # a one-minute TTFT bound: all good
        for request in load["requests"]:
            assert request["ok"] and request["prompt_tokens"] == INPUT_LEN
            assert request["output_tokens"] == OUTPUT_LEN  # ignore_eos: exactly the length asked for
            assert len(request["itl"]) == OUTPUT_LEN - 1  # one streamed chunk per token
            assert 0 < request["ttft"] <= request["e2e"]
    assert f"{NUM_PROMPTS} sent, {NUM_PROMPTS} completed, 0 failed" in stdout


def _counter(path, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(path.read_text())
    return sum(s.value for f in families for s in f.samples if s.name == name)


def test_server_metrics_around_each_load_count_that_load_alone(bench_run) -> None:
    out, _, _ = bench_run
    generated = "smoothserve_generation_tokens_total"
    for rate in ("40", "inf"):
        before, after = out / f"metrics-{rate}-before.txt", out / f"metrics-{rate}-after.txt"
        assert _counter(after, generated) - _counter(before, generated) == NUM_PROMPTS * OUTPUT_LEN, rate
    # The second load's "before" follows the first load's "after": nothing ran in between.
    assert _counter(out / "metrics-inf-before.txt", generated) == _counter(out / "metrics-40-after.txt", generated)


def test_each_load_sends_prompts_the_server_has_not_cached(bench_run) -> None:
    """Had the second rate resent the first rate's (or the warm-up's) prompts, the server's prefix cache
    would serve most of their prefill."""
    out, _, _ = bench_run
    for rate in ("40", "inf"):
        before, after = out / f"metrics-{rate}-before.txt", out / f"metrics-{rate}-after.txt"
        queried = _counter(after, "smoothserve_prefix_cache_queries_total") - _counter(
            before, "smoothserve_prefix_cache_queries_total")  # fmt: skip
        hits = _counter(after, "smoothserve_prefix_cache_hits_total") - _counter(
            before, "smoothserve_prefix_cache_hits_total")  # fmt: skip
        assert queried >= NUM_PROMPTS * (INPUT_LEN - 1) and hits == 0, (rate, queried, hits)


def test_send_and_completion_rates_ignore_the_ramp_and_the_tail() -> None:
    # Sent at 0, 1, 2, 3 s; each takes 5 s: completions 1 per second, as sent, though the load lasts 8 s.
    records = [RequestRecord(True, 10, 5, sent_at=t, ttft=1.0, e2e=5.0, itl=[0.1] * 4) for t in range(4)]
    summary = summarize(records, request_rate=1.0, duration_s=8.0, slo=SLO())
    assert summary.request_throughput == pytest.approx(0.5)
    assert summary.send_rate == pytest.approx(1.0) and summary.completion_rate == pytest.approx(1.0)
    # A server that falls behind: each request waits for the one before it (2 s of service each).
    slow = [RequestRecord(True, 10, 5, sent_at=t, ttft=1.0, e2e=2.0 * (t + 1) - t, itl=[0.1] * 4) for t in range(4)]
    summary = summarize(slow, request_rate=1.0, duration_s=8.0, slo=SLO())
    assert summary.completion_rate == pytest.approx(0.5)
    at_once = summarize([RequestRecord(True, 10, 5, e2e=1.0)] * 3, math.inf, 1.0, SLO())
    assert at_once.send_rate is None and at_once.completion_rate is None  # all sent and done at once


def test_bench_percentiles_are_monotone(bench_run) -> None:
    _, _, document = bench_run
    for load in document["loads"]:
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            stats = load[key]
            values = [stats[f"p{p}"] for p in PERCENTILES] + [stats["max"]]
            assert values == sorted(values) and values[0] > 0, (key, stats)


def test_bench_draws_plots(bench_run) -> None:
    pytest.importorskip("matplotlib")
    out, stdout, _ = bench_run
    for name in PLOT_FILES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {out / name}" in stdout


def test_bench_without_matplotlib_writes_json_and_says_so(server, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, stdout, _ = run_bench(capsys, server, tmp_path, "--num-prompts", "2", "--request-rate", "inf")
    assert code == 0
    assert MISSING_MATPLOTLIB in stdout
    assert json.loads((tmp_path / "bench.json").read_text())["loads"][0]["completed"] == 2
    assert not any((tmp_path / name).exists() for name in PLOT_FILES)


def assert_one_clear_error(code: int, stderr: str, expected: str) -> None:
    assert code == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("smoothserve: error:")]
    assert len(errors) == 1 and expected in errors[0], stderr


def test_unreachable_server_is_one_clear_error(tmp_path, capsys) -> None:
    code = main(["bench", "--url", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path)])
    assert_one_clear_error(code, capsys.readouterr().err, "cannot reach a server")


def test_missing_api_key_is_one_clear_error(server, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("SMOOTHSERVE_API_KEY", raising=False)
    code = main(["bench", "--url", server.url, "--out", str(tmp_path)])
    assert_one_clear_error(code, capsys.readouterr().err, "wants an API key")


def test_too_long_prompts_fail_in_warm_up_with_the_servers_reason(server, tmp_path, capsys) -> None:
    code, _, stderr = run_bench(capsys, server, tmp_path, "--input-len", "250", "--output-len", "50")
    assert_one_clear_error(code, stderr, "the warm-up request failed: this model's maximum context length is 256")
