"""What every benchmark records beside its numbers: the device, the commit, the date, the copy bandwidth."""

from __future__ import annotations

import datetime as dt
import os
import statistics
import subprocess

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
