"""Continuous batching on the CPU with a stand-in model whose next token depends on the whole prefix."""

from __future__ import annotations

import pytest

from engine.config import SchedulerConfig
from engine.kv_cache.block_manager import BlockManager
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus

BLOCK = 4


def next_token(prefix: list[int]) -> int:
    """A deterministic 'model': any error in what the scheduler feeds it changes every later token."""
    return (sum(prefix) * 31 + len(prefix) * 7) % 997


def make_scheduler(num_blocks: int = 64, budget: int = 32, max_seqs: int = 8, chunked: bool = True) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, enable_chunked_prefill=chunked)
    return Scheduler(config, BlockManager(num_blocks, BLOCK))


def step(scheduler: Scheduler, max_tokens: int) -> SchedulerOutput:
    out = scheduler.schedule()
    config = scheduler.config
    assert out.num_batched_tokens <= config.max_num_batched_tokens
    assert len(scheduler.running) <= config.max_num_seqs
    sampled = {}
    for s in out.scheduled:
        seq = scheduler.sequences[s.seq_id]
        # The model reads exactly the cached context plus the new tokens, all of them known.
        assert s.num_computed_tokens + s.num_new_tokens <= seq.num_tokens
        assert len(s.block_table) * BLOCK >= s.num_computed_tokens + s.num_new_tokens
        if s.samples:
            sampled[s.seq_id] = next_token(seq.token_ids)
    scheduler.update(out, sampled)
    for seq_id in sampled:
        if len(scheduler.sequences[seq_id].output_token_ids) >= max_tokens:
            scheduler.finish(seq_id, SequenceStatus.FINISHED_LENGTH)
    return out


def run_to_completion(scheduler: Scheduler, arrivals: dict[int, list[Sequence]], max_tokens: int) -> dict:
    finished, outputs = [], {}
    for seqs in arrivals.values():
        finished.extend(seqs)
    for number in range(10_000):
        for seq in arrivals.get(number, []):
            scheduler.add(seq)
        if not scheduler.has_unfinished() and number > max(arrivals):
            break
        step(scheduler, max_tokens)
    for seq in finished:
        assert seq.status == SequenceStatus.FINISHED_LENGTH
        outputs[seq.seq_id] = seq.output_token_ids
    return outputs


def expected_output(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def prompts(count: int, shared_prefix: list[int] | None = None) -> dict[str, list[int]]:
    return {f"s{i}": (shared_prefix or []) + [10 * i + j for j in range(3 + 5 * i)] for i in range(count)}


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    manager = scheduler.blocks
    assert manager.num_free_blocks == manager.num_blocks
    assert all(block.ref_count == 0 for block in manager.blocks)
    assert manager.block_tables == {}


@pytest.mark.parametrize("budget", [4, 7, 64])
def test_outputs_do_not_depend_on_batching_or_chunking(budget: int) -> None:
    scheduler = make_scheduler(budget=budget)
    texts = prompts(6)
    arrivals = {i % 3: [] for i in range(3)}
    for i, (seq_id, prompt) in enumerate(texts.items()):
        arrivals[i % 3].append(Sequence(seq_id, list(prompt)))
    outputs = run_to_completion(scheduler, arrivals, max_tokens=9)
    assert outputs == {seq_id: expected_output(p, 9) for seq_id, p in texts.items()}
    assert_all_blocks_free(scheduler)


def test_decodes_and_a_prefill_chunk_share_a_step() -> None:
    scheduler = make_scheduler(budget=8)
    scheduler.add(Sequence("a", [1, 2, 3]))
    step(scheduler, max_tokens=50)  # a's prompt
    scheduler.add(Sequence("b", list(range(20))))
    out = step(scheduler, max_tokens=50)
    by_id = {s.seq_id: s for s in out.scheduled}
    assert by_id["a"].num_new_tokens == 1 and by_id["a"].samples
    assert by_id["b"].num_new_tokens == 7 and not by_id["b"].samples  # a chunk of b's prompt
    assert out.num_batched_tokens == 8


def test_without_chunked_prefill_prompts_go_whole() -> None:
    scheduler = make_scheduler(budget=10, chunked=False)
    scheduler.add(Sequence("a", list(range(6))))
    scheduler.add(Sequence("b", list(range(100, 106))))
    out = step(scheduler, max_tokens=5)
    assert [(s.seq_id, s.num_new_tokens) for s in out.scheduled] == [("a", 6)]  # b would need a chunk
    out = step(scheduler, max_tokens=5)
    assert [(s.seq_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 6)]


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    scheduler = make_scheduler(num_blocks=10, budget=16)
    texts = prompts(5)
    outputs = run_to_completion(scheduler, {0: [Sequence(k, list(v)) for k, v in texts.items()]}, max_tokens=12)
    assert scheduler.num_preemptions > 0
    assert outputs == {seq_id: expected_output(p, 12) for seq_id, p in texts.items()}
    assert_all_blocks_free(scheduler)


def test_shared_prefixes_hit_the_cache_and_give_the_same_outputs() -> None:
    scheduler = make_scheduler(budget=64)
    shared = list(range(500, 513))  # 13 tokens: 3 full blocks
    texts = prompts(4, shared_prefix=shared)
    first, rest = list(texts.items())[:1], list(texts.items())[1:]
    arrivals = {0: [Sequence(k, list(v)) for k, v in first], 2: [Sequence(k, list(v)) for k, v in rest]}
    outputs = run_to_completion(scheduler, arrivals, max_tokens=5)
    assert outputs == {seq_id: expected_output(p, 5) for seq_id, p in texts.items()}
    assert scheduler.stats().prefix_cache_hits >= 3 * 3 * BLOCK  # each later prompt reused 3 blocks


def test_max_num_seqs_caps_the_running_set() -> None:
    scheduler = make_scheduler(max_seqs=2, budget=64)
    for i in range(4):
        scheduler.add(Sequence(f"s{i}", [i, i + 1]))
    out = step(scheduler, max_tokens=10)
    assert len(out.scheduled) == 2 and scheduler.stats().num_waiting == 2


def test_first_come_first_served_no_overtaking() -> None:
    scheduler = make_scheduler(num_blocks=6, budget=64)
    scheduler.add(Sequence("running", list(range(14))))  # 4 of the 6 blocks
    step(scheduler, max_tokens=50)
    scheduler.add(Sequence("big", list(range(100, 110))))  # needs 3 blocks: only 2 are free
    scheduler.add(Sequence("small", [1, 2]))  # would fit in 1, but must not overtake "big"
    out = step(scheduler, max_tokens=50)
    assert [s.seq_id for s in out.scheduled] == ["running"]
    assert [seq.seq_id for seq in scheduler.waiting] == ["big", "small"]


@pytest.mark.parametrize("when", ["waiting", "mid-prefill", "decoding"])
def test_abort_frees_every_block(when: str) -> None:
    scheduler = make_scheduler(budget=8)
    scheduler.add(Sequence("x", list(range(30))))
    scheduler.add(Sequence("y", [1, 2, 3]))
    if when == "mid-prefill":
        step(scheduler, max_tokens=100)
        assert 0 < scheduler.sequences["x"].num_computed_tokens < 30
    if when == "decoding":
        for _ in range(6):
            step(scheduler, max_tokens=100)
        assert scheduler.sequences["x"].output_token_ids
    aborted = scheduler.abort("x")
    assert aborted is not None and aborted.status == SequenceStatus.FINISHED_ABORTED
    assert scheduler.abort("x") is None  # twice is harmless
    scheduler.abort("y")
    assert_all_blocks_free(scheduler)
    assert not scheduler.has_unfinished()
    assert step(scheduler, max_tokens=1).is_empty


def test_a_sequence_larger_than_the_cache_is_refused() -> None:
    scheduler = make_scheduler(num_blocks=4)
    with pytest.raises(ValueError, match="cannot fit the KV cache"):
        scheduler.add(Sequence("huge", list(range(16))))
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add(Sequence("a", [1]))
        scheduler.add(Sequence("a", [1]))
