"""The loop of tensor-parallel ranks 1..N-1, each in its own process (spawned by `executor`).

A worker joins the process group, loads its share of the model, and then obeys rank 0's messages on
its pipe: size the KV cache, build the model runner, run a step (no reply: the collectives inside the
forward keep the ranks in step), shut down. It exits when rank 0 goes away: the pipe then reads EOF,
and a watchdog thread also notices a new parent process id (rank 0 killed while this rank is inside
a collective).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.distributed import parallel_state
from engine.distributed.sharding import Shard
from engine.errors import ConfigError

STORE_HOST = "127.0.0.1"  # one host: the ranks are processes of one machine
PARENT_POLL_S = 0.5


def rank_device(device: str, rank: int, world_size: int) -> torch.device:
    """Rank r runs on GPU r (of those visible), or on the CPU."""
    wants_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"with tensor parallelism the device must be 'auto', 'cuda' or 'cpu' (rank r uses GPU r), "
                          f"got {device!r}")  # fmt: skip
    if not wants_cuda:
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if world_size > visible:
        raise ConfigError(f"tensor_parallel_size {world_size} needs {world_size} GPUs, but {visible} are visible")
    return torch.device("cuda", rank)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def max_model_len(config: EngineConfig, max_positions: int) -> int:
    return min(config.model.max_model_len or max_positions, max_positions)


def _exit_with_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # rank 0 is gone: nothing can use this rank any more

    threading.Thread(target=watch, name="smoothserve-parent-watch", daemon=True).start()


def worker_main(rank: int, config: EngineConfig, store_port: int, conn: Connection) -> None:
    """Process entry point of rank `rank`."""
    # Rank 0 alone decides when this rank stops (a Ctrl-C or SIGTERM to the process group starts the server's
    # drain, during which the ranks must keep running); it can still SIGKILL it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    try:
        conn.send(("ok", None))  # imported and running: rank 0 may now wait in the process group's rendezvous
        _serve(rank, config, store_port, conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # rank 0 closed the pipe without a shutdown message: it died
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    else:
        return  # told to shut down: a normal exit
    # No interpreter teardown after a failure: the process group may be broken, and its destructor could block.
    os._exit(1)


def _serve(rank: int, config: EngineConfig, store_port: int, conn: Connection) -> None:
    from engine.model_runner import ModelRunner, kv_cache_blocks
    from engine.models.loader import load_model

    world = config.parallel.tensor_parallel_size
    timeout_s = config.parallel.collective_timeout_s
    device = rank_device(config.model.device, rank, world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    store = dist.TCPStore(STORE_HOST, store_port, world, is_master=False, timeout=timedelta(seconds=timeout_s))
    parallel_state.init(rank, world, backend_for(device), store, timeout_s, device)

    loaded = load_model(config.model, Shard(rank, world), device)
    model_len = max_model_len(config, loaded.arch.max_position_embeddings)
    conn.send(("ok", None))
    runner: ModelRunner | None = None
    while True:
        method, argument = conn.recv()
        if method == "step":
            assert runner is not None, "a step before the model runner was built"
            runner.run(argument)
        elif method == "kv_cache_blocks":
            conn.send(("ok", kv_cache_blocks(loaded.model, config, device, loaded.dtype, model_len)))
        elif method == "build_runner":
            runner = ModelRunner(loaded.model, config.cache, argument, device, loaded.dtype, max_model_len=model_len,
                                 max_num_seqs=config.scheduler.max_num_seqs,
                                 enforce_eager=config.model.enforce_eager)  # fmt: skip
            conn.send(("ok", None))
        elif method == "shutdown":
            parallel_state.destroy()
            return
        else:
            raise RuntimeError(f"unknown message from rank 0: {method!r}")
