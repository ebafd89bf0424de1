"""The FP16-vs-W8A8 serving report: which rate counts as sustained, and the targets it derives."""

from __future__ import annotations

import json
import math

from benchmarks import serving_report


def _summary(rate: float, throughput: float, tokens_per_s: float, ttft_p99: float, itl_p99: float,
             failed: int = 0) -> dict:  # fmt: skip
    def dist(p99: float) -> dict[str, float]:
        return {"mean": p99 / 2, "p50": p99 / 3, "p99": p99, "max": p99 * 1.5}

    return {"request_rate": rate, "num_requests": 100, "completed": 100 - failed, "failed": failed,
            "request_throughput": throughput, "output_token_throughput": tokens_per_s,
            "ttft_ms": dist(ttft_p99), "itl_ms": dist(itl_p99), "tpot_ms": dist(itl_p99),
            "e2e_ms": dist(9e3)}  # fmt: skip


def _run(loads: list[dict]) -> dict:
    return {"date": "2026-11-23T00:00:00+00:00", "config": {"input_len": 512, "output_len": 128, "num_prompts": 100,
            "arrivals": "poisson"}, "loads": loads}  # fmt: skip


def test_targets_use_the_highest_rate_fp16_sustains(tmp_path) -> None:
    fp16 = _run([_summary(1, 0.98, 125, 80, 30), _summary(4, 3.9, 500, 150, 40),
                 _summary(16, 6.0, 760, 9000, 90), _summary(math.inf, 6.1, 780, 20000, 95)])  # fmt: skip
    w8a8 = _run([_summary(1, 0.99, 127, 50, 20), _summary(4, 3.95, 505, 90, 25),
                 _summary(16, 11.0, 1400, 800, 45), _summary(math.inf, 11.5, 1450, 9000, 50)])  # fmt: skip
    report = serving_report.compare(fp16, w8a8)
    assert report["highest_sustained_fp16_rate"] == 4  # at 16 req/s FP16 served 6/s: not sustained
    throughput, ttft, itl = report["targets"]
    assert math.isclose(throughput["value"], 1450 / 780) and throughput["pass"]
    assert math.isclose(ttft["value"], 90 / 150) and ttft["pass"]
    assert math.isclose(itl["value"], 25 / 40) and itl["pass"]
    assert len(report["rows"]) == 8

    for name, run in (("fp16", fp16), ("w8a8", w8a8)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "bench.json").write_text(json.dumps(run))
    written = serving_report.main(["--fp16", str(tmp_path / "fp16"), "--w8a8", str(tmp_path / "w8a8"),
                                   "--device-name", "NVIDIA H100 80GB HBM3", "--out", str(tmp_path)])  # fmt: skip
    assert written["targets"] == report["targets"]
    assert "| 4 | w8a8 | 100 | 0 | 3.95 | 505 |" in (tmp_path / "serving-h100-80gb-hbm3.md").read_text()


def test_sustained_reads_the_send_and_completion_rates_where_the_bench_measured_them() -> None:
    # 96 requests at 8/s: the whole load (ramp and tail) averaged 5.9/s, but requests completed as fast as
    # they were sent.
    kept_up = {**_summary(8, 5.9, 750, 100, 50), "send_rate": 7.8, "completion_rate": 7.6}
    fell_behind = {**_summary(8, 5.9, 750, 100, 50), "send_rate": 7.8, "completion_rate": 6.2}
    assert serving_report.sustained(kept_up) and not serving_report.sustained(fell_behind)
    assert not serving_report.sustained(_summary(8, 5.9, 750, 100, 50))  # an older summary: 5.9 < 0.9 x 8


def test_a_slower_w8a8_fails_and_failures_are_not_sustained() -> None:
    fp16 = _run([_summary(2, 1.95, 250, 100, 30), _summary(8, 7.9, 1000, 200, 40, failed=3)])
    w8a8 = _run([_summary(2, 1.96, 251, 120, 35), _summary(8, 7.95, 1010, 150, 30)])
    report = serving_report.compare(fp16, w8a8)
    assert report["highest_sustained_fp16_rate"] == 2  # failed requests at 8 req/s
    throughput, ttft, itl = report["targets"]
    assert not throughput["pass"] and not ttft["pass"] and not itl["pass"]


def test_step_profile_reads_a_servers_metrics(tmp_path) -> None:
    from engine.llm_engine import StepTiming
    from engine.scheduler import SchedulerStats
    from server.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    stats = SchedulerStats(0, 0, 0.0, 0, 0, 0)
    metrics.update_engine(stats, (), StepTiming("eager", 600, 0.001, 0.030, 0.010, 0.002))
    for _ in range(3):
        metrics.update_engine(stats, (), StepTiming("decode_graph", 8, 0.001, 0.002, 0.012, 0.001))
    metrics.update_engine(stats, (), None)  # an idle pass after aborts: not a step
    profile = serving_report.step_profile(metrics.render().decode())
    assert profile["steps"] == {"decode_graph": 3, "eager": 1}
    assert math.isclose(profile["tokens_per_step"], (600 + 3 * 8) / 4)
    expected = {"schedule": 1.0, "forward": (30 + 3 * 2) / 4, "sample": (10 + 3 * 12) / 4, "postprocess": 5 / 4}
    assert profile["phase_ms_per_step"].keys() == expected.keys()
    for phase, ms in expected.items():
        assert math.isclose(profile["phase_ms_per_step"][phase], ms), phase

    fp16 = _run([_summary(math.inf, 6.0, 760, 900, 90)])
    w8a8 = _run([{**_summary(math.inf, 9.0, 1100, 800, 60), "duration_s": 0.2}])
    for name, run in (("fp16", fp16), ("w8a8", w8a8)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "bench.json").write_text(json.dumps(run))
    (tmp_path / "w8a8" / "metrics.txt").write_text(metrics.render().decode())  # the FP16 server's was not saved
    written = serving_report.main(["--fp16", str(tmp_path / "fp16"), "--w8a8", str(tmp_path / "w8a8"),
                                   "--device-name", "NVIDIA H100 80GB HBM3", "--out", str(tmp_path)])  # fmt: skip
    assert list(written["engine_steps"]) == ["w8a8"]
    markdown = (tmp_path / "serving-h100-80gb-hbm3.md").read_text()
    # The loads took 0.2 s, the engine's steps 0.091 s of it.
    assert "| w8a8 | 3 | 1 | 156.0 | 1.00 | 9.00 | 11.50 | 1.25 | 45.5 % |" in markdown


def test_per_rate_scrapes_profile_the_highest_rate_alone(tmp_path) -> None:
    from engine.llm_engine import StepTiming
    from engine.scheduler import SchedulerStats
    from server.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    stats = SchedulerStats(0, 0, 0.0, 0, 0, 0)
    for _ in range(5):  # the rate-2 load: slow eager steps
        metrics.update_engine(stats, (), StepTiming("eager", 100, 0.001, 0.050, 0.050, 0.001))
    before = metrics.render().decode()
    for _ in range(4):  # the rate-inf load: decode steps of 4 ms
        metrics.update_engine(stats, (), StepTiming("decode_graph", 64, 0.0, 0.001, 0.003, 0.0))
    after = metrics.render().decode()
    for name, rate in (("fp16", 6.0), ("w8a8", 9.0)):
        run = _run([_summary(2, 1.9, 250, 100, 30), {**_summary(math.inf, rate, 1000, 900, 60), "duration_s": 0.032}])
        (tmp_path / name).mkdir()
        (tmp_path / name / "bench.json").write_text(json.dumps(run))
        (tmp_path / name / "metrics-inf-before.txt").write_text(before)
        (tmp_path / name / "metrics-inf-after.txt").write_text(after)
        (tmp_path / name / "metrics.txt").write_text(after)  # the whole run: not what is reported
    written = serving_report.main(["--fp16", str(tmp_path / "fp16"), "--w8a8", str(tmp_path / "w8a8"),
                                   "--device-name", "NVIDIA H100 80GB HBM3", "--out", str(tmp_path)])  # fmt: skip
    profile = written["engine_steps"]["w8a8"]
    assert profile["steps"] == {"decode_graph": 4, "eager": 0}
    assert math.isclose(profile["tokens_per_step"], 64)
    assert math.isclose(profile["phase_ms_per_step"]["sample"], 3.0)
    assert math.isclose(profile["busy_fraction"], 0.016 / 0.032)  # 4 steps of 4 ms in a 32 ms load
    assert "Engine steps at rate inf" in (tmp_path / "serving-h100-80gb-hbm3.md").read_text()


def test_a_third_server_gets_its_own_targets() -> None:
    fp16 = _run([_summary(4, 3.9, 500, 150, 40), _summary(math.inf, 6.1, 780, 20000, 95)])
    w8a8 = _run([_summary(4, 3.95, 505, 160, 45), _summary(math.inf, 8.0, 1000, 9000, 50)])
    kv8 = _run([_summary(4, 3.95, 506, 120, 30), _summary(math.inf, 11.0, 1400, 8000, 40)])
    report = serving_report.compare(fp16, w8a8, {"w8a8-kv8": kv8})
    assert len(report["targets"]) == 6 and len(report["rows"]) == 6
    w8a8_throughput, w8a8_ttft, _, kv8_throughput, kv8_ttft, kv8_itl = report["targets"]
    assert not w8a8_throughput["pass"] and not w8a8_ttft["pass"]
    assert "int8 KV" in kv8_throughput["target"] and kv8_throughput["pass"]
    assert math.isclose(kv8_throughput["value"], 1400 / 780)
    assert kv8_ttft["pass"] and math.isclose(kv8_itl["value"], 30 / 40)
