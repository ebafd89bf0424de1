"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step has a token budget (`max_num_batched_tokens`) and a cap on running sequences
(`max_num_seqs`). Running sequences come first, oldest first: a decode takes one token, a prompt being
prefilled in chunks takes what the budget leaves. Waiting sequences are then admitted first come, first
served, with their cached prefix skipped, as long as budget, sequence slots and KV blocks last; a
sequence that does not fit blocks the ones behind it (no overtaking).

When a running sequence needs a block and none is free, the newest running sequence is preempted:
its blocks are freed and it goes back to the front of the queue, to be recomputed from its tokens
(prompt and what it generated so far) when it is admitted again. No step admits new sequences after
a preemption. A sequence larger than the whole cache is refused by `add`, so preemption always ends.

Pure Python: ints and lists in, a `SchedulerOutput` out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.config import SchedulerConfig
from engine.kv_cache.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSequence:
    seq_id: str
    num_new_tokens: int  # fed to the model this step, starting at num_computed_tokens
    num_computed_tokens: int  # already in the KV cache: the context the new tokens attend to
    samples: bool  # the chunk reaches the last known token, so the step samples the next one
    block_table: tuple[int, ...]


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledSequence, ...]
    preempted: tuple[str, ...]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use
    num_preemptions: int  # since start
    prefix_cache_queries: int  # tokens looked up, since start
    prefix_cache_hits: int  # tokens found cached, since start


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.sequences: dict[str, Sequence] = {}
        self.num_preemptions = 0

    @property
    def max_seq_len(self) -> int:
        """The most tokens one sequence can hold: the whole cache."""
        return self.blocks.num_blocks * self.blocks.block_size

    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self.sequences:
            raise ValueError(f"sequence id {seq.seq_id!r} is already scheduled")
        if seq.num_tokens >= self.max_seq_len:
            raise ValueError(
                f"sequence of {seq.num_tokens} tokens cannot fit the KV cache ({self.max_seq_len} tokens in all)"
            )
        seq.status = SequenceStatus.WAITING
        self.sequences[seq.seq_id] = seq
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.sequences)

    # ----------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[str] = []

        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._allocate_or_preempt(seq, num_new, preempted):
                break  # seq itself was preempted: nothing newer is left running
            scheduled.append(self._scheduled(seq, num_new))
            budget -= num_new
            index += 1

        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.cached_prefix(seq.token_ids)
            num_computed = len(cached) * self.blocks.block_size
            remaining = seq.num_tokens - num_computed
            num_new = min(remaining, budget)
            if num_new < remaining and not self.config.enable_chunked_prefill:
                break
            if not self.blocks.allocate(seq.seq_id, seq.token_ids, num_computed + num_new, cached=cached):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = num_computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._scheduled(seq, num_new))
            budget -= num_new
        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> None:
        """Record a finished step: the new tokens are cached, and sampled tokens extend their sequences."""
        for s in output.scheduled:
            seq = self.sequences.get(s.seq_id)
            if seq is None:  # aborted while the step ran
                continue
            seq.num_computed_tokens = s.num_computed_tokens + s.num_new_tokens
            if s.samples:
                seq.token_ids.append(sampled[s.seq_id])

    def finish(self, seq_id: str, status: SequenceStatus) -> Sequence | None:
        """End a sequence in any state (finished or aborted) and free its blocks. Unknown ids: None."""
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status")
        seq = self.sequences.pop(seq_id, None)
        if seq is None:
            return None
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free(seq_id)
        seq.status = status
        return seq

    def abort(self, seq_id: str) -> Sequence | None:
        return self.finish(seq_id, SequenceStatus.FINISHED_ABORTED)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.blocks.usage,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=self.blocks.stats.queries,
            prefix_cache_hits=self.blocks.stats.hits,
        )

    # ----------------------------------------------------------------------------------------------

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, preempted: list[str]) -> bool:
        """Blocks for seq's next num_new tokens, preempting the newest running sequences as needed.
        False when seq itself had to be preempted."""
        while not self.blocks.allocate(seq.seq_id, seq.token_ids, seq.num_computed_tokens + num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.seq_id)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _scheduled(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        return ScheduledSequence(
            seq_id=seq.seq_id,
            num_new_tokens=num_new,
            num_computed_tokens=seq.num_computed_tokens,
            samples=seq.num_computed_tokens + num_new == seq.num_tokens,
            block_table=tuple(self.blocks.block_table(seq.seq_id)),
        )
