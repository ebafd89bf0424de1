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


def init(rank: int, world_size: int, backend: str, store: dist.Store, timeout_s: float, device: torch.device) -> None:
    """Join the group of `world_size` ranks (NCCL on GPUs, gloo on the CPU); collectives give up after
    `timeout_s` instead of hanging on a rank that died or stopped. `device` is this rank's device, already
    current (`torch.cuda.set_device`) so that NCCL binds its communicator to it."""
    global _world_size, _rank
    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel process group already exists in this process; shut its engine down first")
    # Read by NCCL when it creates its first communicator, so set before any collective of this process.
    # NVLink SHARP (multicast) must stay off: it reserves memory and is not available on every host we get.
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    # An NCCL collective runs on the GPU and returns at once; PyTorch's watchdog thread times it out. 3 (the
    # default since PyTorch 2.2; an operator's own setting wins): a timed-out rank ends its process instead of
    # hanging forever. Rank 0 normally notices first (`TensorParallelExecutor.wait_step`).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))  # fmt: skip
    # NCCL creates its communicator at the first collective, and cannot inside a CUDA graph capture: do it now,
    # on every rank at once, which also proves every rank can reach every other before the model loads.
    warm_up = torch.zeros(1, device=device)
    dist.all_reduce(warm_up)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    _world_size, _rank = world_size, rank


def destroy(abort: bool = False) -> None:
    """Leave the process group; `abort` after a failure, when a collective may still be in flight."""
    global _world_size, _rank
    if dist.is_initialized():
        # An NCCL collective waiting for a rank that died never finishes: destroying the group would wait for
        # it, aborting the communicator ends it. (gloo collectives are synchronous: nothing is in flight.)
        abort_group = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort and abort_group is not None and dist.get_backend() == "nccl":
            abort_group()
        else:
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
