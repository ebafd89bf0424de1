"""Wall-clock timing of model calls; on a GPU the clock stops only after the queued kernels finish."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def timed(device: torch.device, fn: Callable[[], T]) -> tuple[T, float]:
    """(fn(), seconds it took)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - started
