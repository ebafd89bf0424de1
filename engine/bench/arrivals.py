"""When each request of a load is sent: Poisson or fixed-rate arrivals, or all at once (rate inf)."""

from __future__ import annotations

import math
import random
from typing import Literal

Arrivals = Literal["poisson", "fixed"]


def arrival_times(num_requests: int, rate: float, arrivals: Arrivals, seed: int) -> list[float]:
    """Send times in seconds from the start, non-decreasing; the first request goes at 0.

    Poisson arrivals have exponential gaps of mean 1/rate (seeded, so a load can be replayed).
    """
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    times, now = [], 0.0
    for index in range(num_requests):
        if index:
            now += rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate
        times.append(now)
    return times


def parse_rates(spec: str) -> list[float]:
    """`1,4,16,inf` -> [1.0, 4.0, 16.0, inf]."""
    rates = []
    for part in spec.split(","):
        try:
            rate = float(part.strip())
        except ValueError:
            raise ValueError(f"request rate {part.strip()!r} is not a number or inf") from None
        if not rate > 0:
            raise ValueError(f"request rates must be > 0, got {part.strip()}")
        rates.append(rate)
    return rates
