"""Combine `smoothserve bench` runs (FP16 and W8A8 servers under the same load; optionally W8A8 with an
int8 KV cache too) into serving-<device>.{json,md} with the evaluation issue's targets.

    python -m benchmarks.serving_report --fp16 DIR --w8a8 DIR [--w8a8-kv8 DIR] --device-name "NVIDIA H100 80GB HBM3"

Targets: W8A8 output tokens/s at saturation (the best rate) >= 1.6 x FP16's; at the highest request rate
FP16 sustains (every request completed, and completed at >= 90 % of the rate they were sent at; see
`sustained`), W8A8's p99 TTFT and p99 inter-token latency <= FP16's. Each W8A8 server is judged on its own.

Where a server's /metrics was saved, the report adds where its engine steps spent their time: steps by kind
(CUDA-graph decode or eager) and the mean host time per step of each phase
(`smoothserve_engine_step_phase_seconds`). With `bench --server-metrics` (metrics-RATE-before.txt and
-after.txt beside bench.json) that is the highest rate's load alone; otherwise metrics.txt, scraped after
all loads, gives the whole run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import git_commit, targets_table, write_report
from engine.bench.report import rate_label
from engine.llm_engine import StepTiming

THROUGHPUT_RATIO_TARGET = 1.6
SUSTAINED_FRACTION = 0.9
# How each server is named in the targets.
LABELS = {"w8a8": "W8A8", "w8a8-kv8": "W8A8 with int8 KV cache"}


def load(path: Path) -> dict:
    return json.loads((path / "bench.json").read_text())


def _step_totals(metrics_text: str) -> tuple[dict[str, float], dict[str, float], float]:
    """The engine's cumulative step counters in a /metrics scrape: steps by kind, seconds by phase, tokens."""
    steps: dict[str, float] = {}
    phase_sums: dict[str, float] = {}
    tokens = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "smoothserve_engine_steps_total":
                steps[sample.labels["kind"]] = sample.value
            elif sample.name == "smoothserve_engine_step_phase_seconds_sum":
                phase_sums[sample.labels["phase"]] = sample.value
            elif sample.name == "smoothserve_engine_step_tokens_total":
                tokens = sample.value
    return steps, phase_sums, tokens


def step_profile(metrics_text: str, before_text: str | None = None) -> dict:
    """Steps by kind, tokens per step and mean ms per step of each phase, from a /metrics scrape (minus an
    earlier scrape of the same server, for what happened between the two)."""
    steps, phase_sums, tokens = _step_totals(metrics_text)
    if before_text is not None:
        steps_0, phase_sums_0, tokens_0 = _step_totals(before_text)
        steps = {kind: value - steps_0.get(kind, 0.0) for kind, value in steps.items()}
        phase_sums = {phase: value - phase_sums_0.get(phase, 0.0) for phase, value in phase_sums.items()}
        tokens -= tokens_0
    total = sum(steps.values())
    return {"steps": steps, "tokens_per_step": tokens / total if total else None, "engine_s": sum(phase_sums.values()),
            "phase_ms_per_step": {phase: 1e3 * value / total if total else None
                                  for phase, value in phase_sums.items()}}  # fmt: skip


def sustained(load_summary: dict) -> bool:
    """Every request served, and at a finite rate the server kept up with the arrivals: it completed requests
    at >= 90 % of the rate they were sent (both measured between the first and the last event, so the
    load's ramp and tail do not count against a short load). Summaries without those rates (older bench
    runs) compare the whole load's throughput with the rate asked for."""
    if load_summary["failed"]:
        return False
    rate = load_summary["request_rate"]
    if math.isinf(rate):
        return True
    sent, completed = load_summary.get("send_rate"), load_summary.get("completion_rate")
    if sent is not None and completed is not None:
        return completed >= SUSTAINED_FRACTION * sent
    return load_summary["request_throughput"] >= SUSTAINED_FRACTION * rate


def _rate(value: float | str) -> float:
    return float(value)


def compare(fp16: dict, w8a8: dict, extra: dict[str, dict] | None = None) -> dict:
    """Targets for the W8A8 server (and for each `extra` one, by name) against FP16, at the rates all ran."""

    def by_rate(run: dict) -> dict[float, dict]:
        return {_rate(summary["request_rate"]): summary for summary in run["loads"]}

    servers = {"fp16": by_rate(fp16), "w8a8": by_rate(w8a8), **{n: by_rate(r) for n, r in (extra or {}).items()}}
    fp16_loads = servers["fp16"]
    rates = sorted(set.intersection(*(set(loads) for loads in servers.values())))
    best = {name: max(s["output_token_throughput"] for s in loads.values()) for name, loads in servers.items()}
    finite_sustained = [r for r in rates if not math.isinf(r) and sustained(fp16_loads[r])]
    highest = max(finite_sustained) if finite_sustained else None
    targets = []
    for name, loads in servers.items():
        if name == "fp16":
            continue
        label = LABELS.get(name, name)
        targets.append({
            "target": f"{label} output tokens/s at saturation >= {THROUGHPUT_RATIO_TARGET} x FP16's",
            "value": best[name] / best["fp16"] if best["fp16"] else None,
            "pass": bool(best["fp16"]) and best[name] >= THROUGHPUT_RATIO_TARGET * best["fp16"],
        })  # fmt: skip
        for metric, what in (("ttft_ms", "p99 TTFT"), ("itl_ms", "p99 inter-token latency")):
            if highest is None:
                targets.append({"target": f"{label} {what} <= FP16's at FP16's highest sustained rate",
                                "value": None, "pass": False})  # fmt: skip
                continue
            ours, theirs = loads[highest][metric].get("p99"), fp16_loads[highest][metric].get("p99")
            targets.append({
                "target": f"{label} {what} <= FP16's at {highest:g} req/s (FP16's highest sustained rate)",
                "value": ours / theirs if ours is not None and theirs else None,
                "pass": ours is not None and theirs is not None and ours <= theirs,
            })  # fmt: skip
    rows = [{"rate": r, "variant": name, **{k: loads[r][k] for k in (
                "completed", "failed", "request_throughput", "output_token_throughput")},
             "ttft_p50_ms": loads[r]["ttft_ms"].get("p50"), "ttft_p99_ms": loads[r]["ttft_ms"].get("p99"),
             "itl_p50_ms": loads[r]["itl_ms"].get("p50"), "itl_p99_ms": loads[r]["itl_ms"].get("p99"),
             "tpot_p50_ms": loads[r]["tpot_ms"].get("p50"), "e2e_p99_ms": loads[r]["e2e_ms"].get("p99")}
            for r in rates for name, loads in servers.items()]  # fmt: skip
    return {"rows": rows, "targets": targets, "highest_sustained_fp16_rate": highest}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def to_markdown(report: dict) -> str:
    lines = [f"# Serving benchmark: {report['device']}", "",
             f"Date {report['date']}, commit {report['commit']}. Model {report['model']} (random weights); "
             f"{report['workload']}.", "", *targets_table(report["targets"])]  # fmt: skip
    lines += ["", "| rate (req/s) | server | done | failed | req/s | output tok/s | TTFT p50 / p99 ms | "
              "ITL p50 / p99 ms | TPOT p50 ms | E2E p99 ms |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["rows"]:
        lines.append(
            f"| {r['rate']:g} | {r['variant']} | {r['completed']} | {r['failed']} | {r['request_throughput']:.2f} | "
            f"{r['output_token_throughput']:.0f} | {_fmt(r['ttft_p50_ms'])} / {_fmt(r['ttft_p99_ms'])} | "
            f"{_fmt(r['itl_p50_ms'])} / {_fmt(r['itl_p99_ms'])} | {_fmt(r['tpot_p50_ms'])} | {_fmt(r['e2e_p99_ms'])} |"
        )
    if report.get("engine_steps"):
        phases = StepTiming.PHASES
        header = " | ".join(f"{p} ms" for p in phases)
        scope = report.get("engine_steps_scope", "over the whole run")
        lines += ["", f"Engine steps {scope} (host time per step; `sample` includes waiting for the GPU):",
                  "", f"| server | decode-graph steps | eager steps | tokens/step | {header} | engine busy |",
                  "|---|---|---|---|" + "---|" * (len(phases) + 1)]  # fmt: skip
        for name, profile in report["engine_steps"].items():
            per_phase = profile["phase_ms_per_step"]
            busy = profile.get("busy_fraction")
            lines.append(f"| {name} | {profile['steps'].get('decode_graph', 0):.0f} | "
                         f"{profile['steps'].get('eager', 0):.0f} | {_fmt(profile['tokens_per_step'])} | "
                         + " | ".join(_fmt(per_phase.get(p), 2) for p in phases)
                         + f" | {_fmt(None if busy is None else 100 * busy)} % |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp16", type=Path, required=True, help="bench --out directory of the FP16 server")
    parser.add_argument("--w8a8", type=Path, required=True, help="bench --out directory of the W8A8 server")
    parser.add_argument("--w8a8-kv8", type=Path, help="bench --out directory of a W8A8 server with an int8 KV cache")
    parser.add_argument("--device-name", required=True)
    parser.add_argument("--model", default="opt-13b")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    directories = {"fp16": args.fp16, "w8a8": args.w8a8}
    if args.w8a8_kv8 is not None:
        directories["w8a8-kv8"] = args.w8a8_kv8
    runs = {name: load(directory) for name, directory in directories.items()}
    fp16, w8a8 = runs["fp16"], runs["w8a8"]
    extra = {name: run for name, run in runs.items() if name not in ("fp16", "w8a8")}
    config = fp16["config"]
    report = {"device": args.device_name, "date": w8a8["date"], "commit": git_commit(), "model": args.model,
              "workload": f"input {config.get('input_len')} tokens, output {config.get('output_len')}, "
                          f"{config.get('num_prompts')} requests per rate, {config.get('arrivals')} arrivals",
              **compare(fp16, w8a8, extra)}  # fmt: skip
    profiles, scopes = {}, set()
    for name, directory in directories.items():
        run = runs[name]
        top = max(run["loads"], key=lambda load: _rate(load["request_rate"]))
        label = rate_label(_rate(top["request_rate"]))
        before, after = directory / f"metrics-{label}-before.txt", directory / f"metrics-{label}-after.txt"
        if before.exists() and after.exists():
            profile = profiles[name] = step_profile(after.read_text(), before.read_text())
            run_s = top.get("duration_s", 0.0)
            scopes.add(f"at rate {label}")
        elif (directory / "metrics.txt").exists():
            profile = profiles[name] = step_profile((directory / "metrics.txt").read_text())
            run_s = sum(load.get("duration_s", 0.0) for load in run["loads"])  # warm-up requests count too
            scopes.add("over the whole run")
        else:
            continue
        # The share of the load's wall time the engine spent inside its steps: far below 100 % at
        # saturation means the steps wait on something else, such as the server's event loop.
        profile["busy_fraction"] = profile["engine_s"] / run_s if run_s else None
    if profiles:
        report["engine_steps"] = profiles
        report["engine_steps_scope"] = " / ".join(sorted(scopes))
    markdown = to_markdown(report)
    write_report(args.out, "serving", report, markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
