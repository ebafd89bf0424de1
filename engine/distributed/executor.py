"""Rank 0's side of tensor parallelism: start ranks 1..N-1, send them every step, stop them.

Rank 0 is the engine's own process: it runs the scheduler and its share of the model, and samples.
The other ranks are spawned processes (`worker.worker_main`), daemonic, so they cannot outlive it.
Control messages and each step's flattened batch go over one pipe per worker: a pipe never times out
while the server idles (a gloo broadcast would), costs one pickle per step, and reads EOF in the
worker when rank 0 dies. The model's collectives run in the process group (NCCL on GPUs, gloo on the
CPU), whose timeout (`ParallelConfig.collective_timeout_s`) turns a hung or dead rank into an error.

Any failure (a rank that died, a collective that timed out) stops every rank and leaves the engine
failed: `fail` returns the error that `LLMEngine.step` raises from then on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import weakref
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import EngineConfig, ServerConfig
from engine.distributed import parallel_state
from engine.distributed.sharding import Shard
from engine.distributed.worker import STORE_HOST, backend_for, rank_device, worker_main
from engine.errors import ConfigError, WorkerFailedError
from engine.model_runner import StepBatch

logger = logging.getLogger(__name__)

POLL_S = 0.1
STEP_POLL_S = 1e-4  # rank 0 waiting for a step on the GPU: how often it asks whether the GPU is done
# Rank 0's own NCCL watchdog would end the engine's process (the server) at the collective timeout; given this
# much longer, it only backs up `wait_step`, which fails the engine cleanly at the timeout.
WATCHDOG_GRACE_S = 30.0
GRACEFUL_EXIT_S = 5.0  # a worker told to shut down exits well within this
ERROR_REPORT_S = 1.0  # after a failure, how long to wait for the workers' own error messages


@dataclass
class _Worker:
    rank: int
    process: BaseProcess
    conn: Connection


def _exited(worker: _Worker) -> str:
    return f"rank {worker.rank} (pid {worker.process.pid}) exited with code {worker.process.exitcode}"


def _stop(workers: list[_Worker], graceful: bool) -> None:
    """Stop every worker (asking first when `graceful`), and leave this process's group (aborting it when not
    graceful: a collective of the failed step may still be waiting on the GPU)."""
    alive = [w for w in workers if w.process.is_alive()]
    if graceful:
        for worker in alive:
            with contextlib.suppress(OSError):
                worker.conn.send(("shutdown", None))
        deadline = time.monotonic() + GRACEFUL_EXIT_S
        for worker in alive:
            worker.process.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.process.is_alive():  # SIGKILL: also ends a stopped or hung process
            worker.process.kill()
        worker.process.join(GRACEFUL_EXIT_S)
        worker.conn.close()
    parallel_state.destroy(abort=not graceful)


class TensorParallelExecutor:
    def __init__(self, config: EngineConfig) -> None:
        world = config.parallel.tensor_parallel_size
        timeout_s = self.timeout_s = config.parallel.collective_timeout_s
        if dist.is_initialized():  # one tensor-parallel engine per process: the group is process-wide
            raise ConfigError("this process already has a tensor-parallel engine (or another process group); "
                              "shut it down before starting another")  # fmt: skip
        self.shard = Shard(0, world)
        self.device = rank_device(config.model.device, 0, world)
        if self.device.type == "cuda":  # before the process group: NCCL binds to the current device
            torch.cuda.set_device(self.device)
        self.workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop, self.workers, True)  # also runs at interpreter exit
        # Before the workers start: they inherit it (and parallel_state.init sets it for this process).
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        self._store = dist.TCPStore(STORE_HOST, 0, world, is_master=True, timeout=timedelta(seconds=timeout_s),
                                    wait_for_workers=False)  # fmt: skip
        context = mp.get_context("spawn")
        worker_config = dataclasses.replace(config, server=ServerConfig())  # no server settings, no API key
        for rank in range(1, world):
            ours, theirs = context.Pipe()
            process = context.Process(target=worker_main, args=(rank, worker_config, self._store.port, theirs),
                                      name=f"smoothserve-tp-rank{rank}", daemon=True)  # fmt: skip
            process.start()
            theirs.close()
            self.workers.append(_Worker(rank, process, ours))
        logger.info("tensor parallel: %d ranks (%s), workers %s", world, backend_for(self.device),
                    [w.process.pid for w in self.workers])  # fmt: skip
        # A worker that cannot even start (e.g. spawn re-running an unguarded __main__) must fail here, not
        # leave rank 0 waiting in the rendezvous for the whole timeout.
        self.collect("starting (a script that starts a tensor-parallel engine needs `if __name__ == '__main__':`)")
        backend = backend_for(self.device)
        group_timeout_s = timeout_s + WATCHDOG_GRACE_S if backend == "nccl" else timeout_s
        try:
            parallel_state.init(0, world, backend, self._store, group_timeout_s, self.device)
        except Exception as error:
            raise self.fail(error) from error

    # ----------------------------------------------------------------------------------------------
    # Startup: every rank does the same thing at the same time

    def send_all(self, method: str, argument: Any = None) -> None:
        for worker in self.workers:
            self._send(worker, (method, argument))

    def collect(self, what: str) -> list[Any]:
        """Each worker's reply to the last message (or its "loaded" report), waiting as long as it lives."""
        replies = []
        for worker in self.workers:
            while not worker.conn.poll(POLL_S):
                if not worker.process.is_alive() and not worker.conn.poll(0):
                    raise self.fail(f"rank {worker.rank} died while {what}")
            try:
                status, value = worker.conn.recv()
            except (EOFError, OSError):
                raise self.fail(f"rank {worker.rank} died while {what}") from None
            if status == "error":
                logger.error("tensor-parallel rank %d failed while %s:\n%s", worker.rank, what, value)
                raise self.fail(f"rank {worker.rank} failed while {what}: {value.strip().splitlines()[-1]}")
            replies.append(value)
        return replies

    # ----------------------------------------------------------------------------------------------
    # Steps

    def send_step(self, batch: StepBatch) -> None:
        """Hand this step to the other ranks; they run it as rank 0 does (the model runner's `publish`)."""
        for worker in self.workers:
            if not worker.process.is_alive():
                raise self.fail(f"rank {worker.rank} is no longer running")
            self._send(worker, ("step", batch))

    def wait_step(self) -> None:
        """On a GPU, wait until this step's work (its collectives included) is done, watching the other ranks.

        An NCCL collective is queued on the GPU and returns at once: with a rank dead or hung, rank 0 would
        block in the next CUDA call that waits for the GPU (sampling), where no timeout reaches it, until its
        watchdog ends the whole process. Waiting here instead, a dead rank fails the step within POLL_S and a
        hung one after the collective timeout. (gloo collectives block, and time out, by themselves.)
        """
        if self.device.type != "cuda":
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        started = checked = time.monotonic()
        while not done.query():
            time.sleep(STEP_POLL_S)
            now = time.monotonic()
            if now - checked < POLL_S:
                continue
            checked = now
            for worker in self.workers:
                if not worker.process.is_alive():
                    raise self.fail(f"rank {worker.rank} is no longer running")
            if now - started > self.timeout_s:
                raise self.fail(f"the step's collectives did not finish within {self.timeout_s:g} s")

    def _send(self, worker: _Worker, message: tuple[str, Any]) -> None:
        try:
            worker.conn.send(message)
        except OSError:
            raise self.fail(f"rank {worker.rank} is no longer running") from None

    # ----------------------------------------------------------------------------------------------
    # Failure and shutdown

    def fail(self, cause: BaseException | str) -> WorkerFailedError:
        """Stop every rank and describe why; the caller raises the result."""
        reports = []
        deadline = time.monotonic() + ERROR_REPORT_S
        for worker in self.workers:
            report = None
            while report is None and time.monotonic() < deadline:
                try:
                    if worker.conn.poll(POLL_S):
                        status, value = worker.conn.recv()
                        if status == "error":
                            report = f"rank {worker.rank} failed: {value.strip().splitlines()[-1]}"
                            logger.error("tensor-parallel rank %d failed:\n%s", worker.rank, value)
                    elif not worker.process.is_alive():
                        report = _exited(worker)
                    else:  # alive and silent: hung, or waiting in a collective for a rank that died
                        report = f"rank {worker.rank} (pid {worker.process.pid}) did not respond"
                except (EOFError, OSError):
                    worker.process.join(POLL_S)
                    report = _exited(worker)
            if report:
                reports.append(report)
        self._finalizer.detach()
        _stop(self.workers, graceful=False)
        detail = "; ".join(reports) or "no rank reported an error"
        text = str(cause) if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        return WorkerFailedError(f"tensor-parallel engine failed ({text}); {detail}. All ranks were stopped.")

    def shutdown(self) -> None:
        """Stop every rank (asking them first); safe to call more than once."""
        self._finalizer()
