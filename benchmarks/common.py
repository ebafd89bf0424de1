"""What every benchmark records beside its numbers: the device, the commit, the date, the copy bandwidth."""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import statistics
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    if os.environ.get("SMOOTHSERVE_COMMIT"):
        return os.environ["SMOOTHSERVE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_slug(name: str) -> str:
    return name.lower().replace("nvidia ", "").replace(" ", "-")


def provenance(device: torch.device) -> dict[str, str | None]:
    return {
        "device": device_name(device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def release_memory(device: torch.device) -> None:
    """Free what the last model left behind (cycles included) before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth_gbs(reps: int, device: torch.device | str = "cuda") -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus written (the roofline for streaming data)."""
    src = torch.empty(1024**3, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):  # 1 GiB per copy: launch overhead is negligible, no graph needed
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * src.numel() / statistics.median(times) / 1e6


def targets_table(targets: list[dict]) -> list[str]:
    """The markdown lines of a report's target checks (value None: not measured)."""
    lines = ["## Targets", "", "| target | value | result |", "|---|---|---|"]
    for t in targets:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        verdict = ("pass" if t["pass"] else "FAIL") + ("" if t.get("required", True) else " (not required)")
        lines.append(f"| {t['target']} | {value} | {verdict} |")
    return lines


def write_report(out: str | Path, name: str, report: dict, markdown: str) -> None:
    """<out>/<name>-<device>.json and .md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slug = device_slug(report["device"])
    (out / f"{name}-{slug}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}-{slug}.md").write_text(markdown)
