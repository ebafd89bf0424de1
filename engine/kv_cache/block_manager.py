"""The paged KV cache's bookkeeping: which fixed-size blocks hold which sequence's tokens.

Pure Python (ints and lists); the model runner turns block tables into tensors. Each sequence owns a
block table: block i holds its tokens [i * block_size, (i + 1) * block_size). Blocks are reference
counted, so sequences with a common prefix share the blocks of that prefix.

Automatic prefix caching: a full block is identified by a hash chained over every token from the
start of the sequence to the block's end, so equal hashes mean equal prefixes (checked token by token
on a hit, so a hash collision cannot serve wrong KV). A block whose last user is gone keeps its hash
and contents while it waits in the free list, and is reused on a hit until it is evicted: the free
list hands out the least recently freed block first.

Invariant the model runner keeps: within a layer, the KV of every token in the batch is written before
any attention reads the cache, so a block registered (hashed) when it is scheduled may be hit by
another sequence in the same step.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full (its tokens known)
    token_ids: tuple[int, ...] = ()  # the tokens of a hashed block, to verify hits


@dataclass
class PrefixCacheStats:
    queries: int = 0  # tokens looked up
    hits: int = 0  # tokens found cached


def chained_hash(previous: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((previous, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached_blocks: dict[int, int] = {}  # hash -> block id
        self.block_tables: dict[str, list[int]] = {}
        self.num_hashed: dict[str, int] = {}  # leading blocks of each table already hashed
        self.stats = PrefixCacheStats()

    # ----------------------------------------------------------------------------------------------
    # Queries

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_table(self, seq_id: str) -> list[int]:
        return self.block_tables.get(seq_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----------------------------------------------------------------------------------------------
    # Prefix cache

    def cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Block ids holding the longest cached prefix of `token_ids`, in full blocks.

        At least one token is always left to compute, so the model still produces the next logits.
        The blocks are not taken until `allocate` is given them (which also counts the hit in `stats`).
        """
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        previous: int | None = None
        max_blocks = (len(token_ids) - 1) // self.block_size
        for index in range(max_blocks):
            chunk = tuple(token_ids[index * self.block_size : (index + 1) * self.block_size])
            previous = chained_hash(previous, chunk)
            block_id = self.cached_blocks.get(previous)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            found.append(block_id)
        return found

    # ----------------------------------------------------------------------------------------------
    # Allocation

    def allocate(self, seq_id: str, token_ids: list[int], num_tokens: int, cached: list[int] | None = None) -> bool:
        """Make `seq_id`'s table cover its first `num_tokens` tokens, starting with `cached` blocks
        (from `cached_prefix`) if the sequence has no table yet. Returns False, changing nothing, when
        too few blocks are free. `token_ids` are the sequence's known tokens (for hashing full blocks).
        """
        table = self.block_tables.get(seq_id)
        reused = [] if table else list(cached or [])
        current = len(table) if table else len(reused)
        new_blocks = self.blocks_needed(num_tokens) - current
        # Reused blocks sitting in the free list come out of it too.
        reused_from_free = sum(1 for b in reused if self.blocks[b].ref_count == 0)
        if new_blocks + reused_from_free > self.num_free_blocks:
            return False
        if table is None:
            table = self.block_tables[seq_id] = []
            if self.enable_prefix_caching:
                self.stats.queries += len(token_ids)
                self.stats.hits += len(reused) * self.block_size
        for block_id in reused:
            self._take(block_id)
            table.append(block_id)
        for _ in range(max(0, new_blocks)):
            table.append(self._take(self._evict()))
        self._register_full_blocks(seq_id, table, token_ids, num_tokens)
        return True

    def free(self, seq_id: str) -> None:
        """Release a sequence's blocks (abort, finish or preemption). Unknown ids are ignored."""
        table = self.block_tables.pop(seq_id, [])
        self.num_hashed.pop(seq_id, None)
        # Tail blocks first: the shared prefix is freed last and so evicted last.
        for block_id in reversed(table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than taken"
            if block.ref_count == 0:
                if block.hash is None or not self.enable_prefix_caching:
                    self._forget(block)
                self.free_blocks[block_id] = None

    def fork(self, parent_id: str, child_id: str) -> int:
        """Let `child_id` share the parent's full, hashed blocks. Returns how many tokens the child
        has computed that way; it recomputes the rest (a partial last block is never shared, so no
        copy-on-write is ever needed)."""
        if child_id in self.block_tables:
            raise ValueError(f"sequence {child_id} already has blocks")
        shared = [b for b in self.block_tables.get(parent_id, []) if self.blocks[b].hash is not None]
        for block_id in shared:
            self._take(block_id)
        self.block_tables[child_id] = shared
        self.num_hashed[child_id] = len(shared)
        return len(shared) * self.block_size

    # ----------------------------------------------------------------------------------------------

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1
        return block_id

    def _evict(self) -> int:
        """The least recently freed block, its old cache entry dropped."""
        block_id = next(iter(self.free_blocks))
        self._forget(self.blocks[block_id])
        return block_id

    def _forget(self, block: Block) -> None:
        if block.hash is not None and self.cached_blocks.get(block.hash) == block.block_id:
            del self.cached_blocks[block.hash]
        block.hash, block.token_ids = None, ()

    def _register_full_blocks(self, seq_id: str, table: list[int], token_ids: list[int], num_tokens: int) -> None:
        """Hash the table's blocks that are full now; earlier ones were hashed by earlier calls."""
        if not self.enable_prefix_caching:
            return
        start = self.num_hashed.get(seq_id, 0)
        previous = self.blocks[table[start - 1]].hash if start else None
        full = min(num_tokens, len(token_ids)) // self.block_size
        for index in range(start, full):
            block = self.blocks[table[index]]
            chunk = tuple(token_ids[index * self.block_size : (index + 1) * self.block_size])
            if block.hash is None:
                block.hash, block.token_ids = chained_hash(previous, chunk), chunk
                self.cached_blocks.setdefault(block.hash, block.block_id)
            previous = block.hash
        self.num_hashed[seq_id] = max(start, full)
