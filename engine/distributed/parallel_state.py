"""The tensor-parallel process group of this process, and the collectives the model calls.

Until `init` runs (always, at tensor-parallel size 1) every collective returns its input untouched,
so a single-GPU run never touches torch.distributed.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

_world_size = 1
_rank = 0


def init(rank: int, world_size: int, backend: str, store: dist.Store, timeout_s: float) -> None:
    """Join the group of `world_size` ranks (NCCL on GPUs, gloo on the CPU); collectives give up after
    `timeout_s` instead of hanging on a rank that died or stopped."""
    global _world_size, _rank
    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel process group already exists in this process; shut its engine down first")
    # NVLink SHARP (multicast) must stay off: it reserves memory and is not available on every host we get.
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))  # fmt: skip
    _world_size, _rank = world_size, rank


def destroy() -> None:
    global _world_size, _rank
    if dist.is_initialized():
        dist.destroy_process_group()
    _world_size, _rank = 1, 0


def world_size() -> int:
    return _world_size


def rank() -> int:
    return _rank


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place (a row-parallel layer's partial products)."""
    if _world_size == 1:
        return x
    dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, rank 0's first."""
    if _world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=dim)
