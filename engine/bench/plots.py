"""PNG plots of a benchmark (matplotlib is optional: `pip install 'smoothserve[plots]'`)."""

from __future__ import annotations

import math
from pathlib import Path

from engine.bench.report import LATENCIES, rate_label
from engine.bench.runner import BenchResult

PLOT_FILES = ("latency_cdfs.png", "throughput_vs_rate.png", "p99_ttft_vs_rate.png")
MISSING_MATPLOTLIB = "matplotlib is not installed, so no plots were drawn (pip install 'smoothserve[plots]')"


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _rate_axis(result: BenchResult) -> tuple[list[float], list[str]]:
    """x positions of the rates; inf sits one step past the largest finite rate."""
    rates = [load.summary.request_rate for load in result.loads]
    finite = [r for r in rates if not math.isinf(r)]
    beyond = max(finite) * 2 if finite else 1.0
    return [beyond if math.isinf(r) else r for r in rates], [rate_label(r) for r in rates]


def draw_plots(result: BenchResult, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in PLOT_FILES]

    fig, axes = plt.subplots(1, len(LATENCIES), figsize=(4.5 * len(LATENCIES), 4))
    for ax, (name, _key) in zip(axes, LATENCIES, strict=True):
        for load in result.loads:
            ok = [r for r in load.records if r.ok]
            values = {"TTFT": [r.ttft for r in ok], "TPOT": [r.tpot for r in ok], "end-to-end": [r.e2e for r in ok],
                      "inter-token": [gap for r in ok for gap in r.itl]}[name]  # fmt: skip
            ms = np.sort([v * 1000 for v in values if v is not None])
            if len(ms):
                ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post",
                        label=f"{rate_label(load.summary.request_rate)} req/s")  # fmt: skip
        ax.set(title=f"{name} CDF", xlabel="ms", ylabel="fraction of requests" if name != "inter-token" else "fraction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(result.model)
    _save(fig, paths[0])

    x, labels = _rate_axis(result)
    summaries = [load.summary for load in result.loads]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [s.request_throughput for s in summaries], marker="o", color="C0", label="requests/s")
    if any(s.goodput is not None for s in summaries):
        ax.plot(x, [s.goodput or 0.0 for s in summaries], marker="s", color="C2", label="goodput (requests/s)")
    tokens = ax.twinx()
    tokens.plot(x, [s.output_token_throughput for s in summaries], marker="^", color="C1", label="output tokens/s")
    tokens.set_ylabel("output tokens/s")
    ax.set_ylabel("requests/s")
    _finish(ax, x, labels, result.model)
    handles = ax.get_legend_handles_labels()[0] + tokens.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left")
    _save(fig, paths[1])

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [s.ttft_ms.get("p99", float("nan")) for s in summaries], marker="o", label="p99 TTFT")
    ax.set_ylabel("p99 TTFT (ms)")
    _finish(ax, x, labels, result.model)
    _save(fig, paths[2])
    return paths


def _finish(ax, x: list[float], labels: list[str], title: str) -> None:
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(x, labels)
    ax.set(xlabel="request rate (req/s)", title=title)
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
