"""The paged KV cache's block manager: allocation, growth, freeing, forking, prefix caching, eviction."""

from __future__ import annotations

import pytest

from engine.kv_cache.block_manager import BlockManager

BLOCK = 4


def tokens(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def assert_all_free(manager: BlockManager) -> None:
    assert manager.num_free_blocks == manager.num_blocks
    assert all(block.ref_count == 0 for block in manager.blocks)
    assert manager.block_tables == {}


def test_allocate_covers_the_tokens_and_free_returns_every_block() -> None:
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    prompt = tokens(10)
    assert manager.allocate("a", prompt, num_tokens=10)
    assert len(manager.block_table("a")) == 3  # ceil(10 / 4)
    assert manager.num_free_blocks == 5
    manager.free("a")
    assert_all_free(manager)


def test_append_takes_a_new_block_only_at_block_boundaries() -> None:
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    seq = tokens(8)
    assert manager.allocate("a", seq, 8)
    assert len(manager.block_table("a")) == 2
    seq.append(7)
    assert manager.allocate("a", seq, 9)  # token 9 opens block 3
    assert len(manager.block_table("a")) == 3
    for extra in range(3):
        seq.append(extra)
        assert manager.allocate("a", seq, len(seq))
    assert len(manager.block_table("a")) == 3  # 12 tokens still fit in 3 blocks


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    manager = BlockManager(num_blocks=3, block_size=BLOCK)
    assert manager.allocate("a", tokens(8), 8)
    assert not manager.allocate("b", tokens(8, start=500), 8)
    assert manager.block_table("b") == [] and manager.num_free_blocks == 1
    assert manager.allocate("b", tokens(8, start=500), 4)  # a smaller chunk fits


def test_prefix_cache_hit_shares_blocks_and_counts_them() -> None:
    manager = BlockManager(num_blocks=10, block_size=BLOCK)
    shared = tokens(8)
    assert manager.allocate("a", shared + [1, 2, 3], 11)
    cached = manager.cached_prefix(shared + [9, 9])
    assert cached == manager.block_table("a")[:2]
    assert manager.allocate("b", shared + [9, 9], 10, cached=cached)
    assert manager.stats.hits == 8 and manager.stats.queries == 11 + 10
    assert manager.block_table("b")[:2] == manager.block_table("a")[:2]
    assert [manager.blocks[b].ref_count for b in manager.block_table("b")[:2]] == [2, 2]
    manager.free("a")
    manager.free("b")
    assert_all_free(manager)


def test_a_whole_cached_prompt_still_leaves_one_token_to_compute() -> None:
    manager = BlockManager(num_blocks=10, block_size=BLOCK)
    prompt = tokens(8)
    assert manager.allocate("a", prompt, 8)
    assert len(manager.cached_prefix(prompt)) == 1  # 7 tokens at most may come from the cache


def test_freed_blocks_stay_cached_until_evicted() -> None:
    manager = BlockManager(num_blocks=4, block_size=BLOCK)
    prompt = tokens(8)
    assert manager.allocate("a", prompt, 8)
    manager.free("a")
    assert_all_free(manager)
    assert len(manager.cached_prefix(prompt + [1])) == 2  # still there after the sequence ended
    assert manager.allocate("b", tokens(12, start=900), 12)  # needs 3 of 4 blocks: evicts one cached block
    assert len(manager.cached_prefix(prompt + [1])) < 2


def test_eviction_takes_the_least_recently_freed_block_and_keeps_prefixes_longest() -> None:
    manager = BlockManager(num_blocks=4, block_size=BLOCK)
    assert manager.allocate("old", tokens(8, start=0), 8)
    assert manager.allocate("new", tokens(8, start=50), 8)
    manager.free("old")
    manager.free("new")
    assert manager.allocate("x", tokens(4, start=900), 4)  # one block: the tail of "old" goes first
    assert len(manager.cached_prefix(tokens(8, start=0) + [1])) == 1  # old's first block survives
    assert len(manager.cached_prefix(tokens(8, start=50) + [1])) == 2


def test_hash_collision_cannot_serve_wrong_tokens(monkeypatch) -> None:
    import engine.kv_cache.block_manager as module

    monkeypatch.setattr(module, "chained_hash", lambda previous, token_ids: 42)  # everything collides
    manager = BlockManager(num_blocks=6, block_size=BLOCK)
    assert manager.allocate("a", tokens(8), 8)
    assert manager.cached_prefix(tokens(8, start=7) + [1]) == []


def test_fork_shares_full_blocks_and_leaves_the_tail_to_recompute() -> None:
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    seq = tokens(10)
    assert manager.allocate("parent", seq, 10)
    computed = manager.fork("parent", "child")
    assert computed == 8
    assert manager.block_table("child") == manager.block_table("parent")[:2]
    assert manager.allocate("child", seq + [5], 11)
    assert manager.block_table("child")[2] != manager.block_table("parent")[2]
    manager.free("parent")
    manager.free("child")
    assert_all_free(manager)


def test_without_prefix_caching_nothing_is_shared() -> None:
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    assert manager.allocate("a", tokens(8), 8)
    assert manager.cached_prefix(tokens(8) + [1]) == []
    manager.free("a")
    assert_all_free(manager)
    assert manager.cached_blocks == {}


def test_free_of_an_unknown_sequence_is_harmless() -> None:
    manager = BlockManager(num_blocks=2, block_size=BLOCK)
    manager.free("never-allocated")
    assert_all_free(manager)


def test_invalid_sizes_are_rejected() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=16)
