"""Paged attention on the GPU: the decode kernel, the KV-cache write kernel and the prefill path against
the float32 references of engine/ops.py, on fresh random caches laid out in shuffled blocks.

Run on a GPU machine after building the extension; skipped elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine import ops

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
CONTEXTS = [1, 2, 15, 16, 17, 63, 64, 65, 100, 511, 512, 513, 1000, 2048, 3000, 4096]


def _random_cache(num_blocks: int, block_size: int, heads: int, dim: int, dtype, g: torch.Generator):
    shape = (num_blocks, block_size, heads, dim)
    keys = torch.randn(shape, device=CUDA, generator=g).to(dtype)
    return keys, torch.randn(shape, device=CUDA, generator=g).to(dtype)


def _block_tables(lens: list[int], block_size: int, width: int, num_blocks: int, g: torch.Generator) -> torch.Tensor:
    """Each sequence gets distinct blocks in a random order; unused entries point at block 0."""
    tables = torch.zeros((len(lens), width), dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(int(g.initial_seed())))
    used = 0
    for row, n in enumerate(lens):
        need = -(-n // block_size)
        tables[row, :need] = order[used : used + need].to(torch.int32)
        used += need
    return tables.to(CUDA)


def _decode_case(lens: list[int], block_size: int, heads: int, dim: int, dtype, seed: int):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    width = max(1, max(-(-n // block_size) for n in lens))
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    key_cache, value_cache = _random_cache(num_blocks, block_size, heads, dim, dtype, g)
    tables = _block_tables(lens, block_size, width, num_blocks, g)
    # The query as the model produces it: one third of a fused qkv row, so rows are strided.
    qkv = torch.randn(len(lens), 3 * heads * dim, device=CUDA, generator=g).to(dtype)
    query = qkv[:, : heads * dim].view(-1, heads, dim)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=CUDA)
    return query, key_cache, value_cache, tables, seq_lens


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    assert torch.isfinite(actual).all()
    tolerance = 2e-3 if dtype == torch.float16 else 1.6e-2  # one rounding of the output, plus accumulation
    torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dim", [32, 64, 80, 128])
def test_decode_matches_reference_over_context_lengths(dtype, block_size, dim) -> None:
    heads = 8
    for seed, context in enumerate(CONTEXTS):
        # A batch mixing this context length with shorter ones, so partitions end at different places.
        lens = [context, max(1, context // 3), 1 + (context * 7) % 97]
        query, key_cache, value_cache, tables, seq_lens = _decode_case(lens, block_size, heads, dim, dtype, seed)
        expected = ops.paged_attention_decode_reference(query, key_cache, value_cache, tables, seq_lens, dim**-0.5)
        actual = ops.paged_attention_decode(query, key_cache, value_cache, tables, seq_lens, dim**-0.5)
        _assert_close(actual, expected, dtype)


def test_decode_at_opt_shapes_and_padding_rows() -> None:
    """OPT-30B's 56 heads of 128 and OPT-175B's 96; a length-0 row (CUDA-graph padding) gives zeros."""
    for heads in (56, 96):
        lens = [700, 0, 1, 2047]
        query, key_cache, value_cache, tables, seq_lens = _decode_case(lens, 16, heads, 128, torch.float16, heads)
        actual = ops.paged_attention_decode(query, key_cache, value_cache, tables, seq_lens, 128**-0.5)
        expected = ops.paged_attention_decode_reference(query, key_cache, value_cache, tables, seq_lens, 128**-0.5)
        _assert_close(actual, expected, torch.float16)
        assert actual[1].abs().max() == 0


@pytest.mark.parametrize("batch", [1, 17, 40, 80])
def test_decode_over_every_partition_length(batch: int) -> None:
    """The kernel picks its partition length from batch x heads (64 tokens for few rows, up to 512 for
    many): with 8 heads on a 132-SM H100 these batches take 64, 128, 256 and 512."""
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 1500, (batch,), generator=g).tolist()
    lens[0] = 1499
    query, key_cache, value_cache, tables, seq_lens = _decode_case(lens, 16, 8, 64, torch.float16, batch)
    actual = ops.paged_attention_decode(query, key_cache, value_cache, tables, seq_lens, 0.125)
    expected = ops.paged_attention_decode_reference(query, key_cache, value_cache, tables, seq_lens, 0.125)
    _assert_close(actual, expected, torch.float16)


def test_decode_is_not_fooled_by_garbage_beyond_the_length() -> None:
    """Slots past a sequence's length hold NaN: the kernel must never let them into the result."""
    lens = [37, 300]
    query, key_cache, value_cache, tables, seq_lens = _decode_case(lens, 16, 4, 64, torch.float16, 7)
    flat_k, flat_v = key_cache.view(-1, 4, 64), value_cache.view(-1, 4, 64)
    for row, n in enumerate(lens):
        for pos in range(n, tables.shape[1] * 16):
            slot = int(tables[row, pos // 16]) * 16 + pos % 16
            if pos // 16 < -(-n // 16):  # the tail of the sequence's last block
                flat_k[slot] = float("nan")
                flat_v[slot] = float("nan")
    actual = ops.paged_attention_decode(query, key_cache, value_cache, tables, seq_lens, 0.125)
    expected = ops.paged_attention_decode_reference(
        query, key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0), tables, seq_lens, 0.125
    )
    _assert_close(actual, expected, torch.float16)


def test_decode_kernel_replays_in_a_cuda_graph_with_new_lengths() -> None:
    lens = [10, 600, 1500]
    query, key_cache, value_cache, tables, seq_lens = _decode_case(lens, 16, 8, 128, torch.float16, 3)
    static_lens = seq_lens.clone()
    ops.paged_attention_decode(query, key_cache, value_cache, tables, static_lens, 0.1)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.paged_attention_decode(query, key_cache, value_cache, tables, static_lens, 0.1)
    for new_lens in ([10, 600, 1500], [1, 513, 1024], [0, 50, 1]):
        static_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        expected = ops.paged_attention_decode_reference(query, key_cache, value_cache, tables, static_lens, 0.1)
        _assert_close(out, expected, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_write_kv_cache_matches_reference_and_skips_padding(dtype) -> None:
    g = torch.Generator(device=CUDA).manual_seed(11)
    heads, dim, tokens = 56, 128, 77
    qkv = torch.randn(tokens, 3 * heads * dim, device=CUDA, generator=g).to(dtype)
    key = qkv[:, heads * dim : 2 * heads * dim].view(tokens, heads, dim)
    value = qkv[:, 2 * heads * dim :].view(tokens, heads, dim)
    key_cache, value_cache = _random_cache(20, 16, heads, dim, dtype, g)
    slots = torch.randperm(20 * 16, device=CUDA, generator=g)[:tokens]
    slots[::5] = -1
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    keep = slots >= 0
    expected_k.view(-1, heads, dim)[slots[keep]] = key[keep]
    expected_v.view(-1, heads, dim)[slots[keep]] = value[keep]
    ops.write_kv_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache, expected_k)
    assert torch.equal(value_cache, expected_v)


@pytest.mark.parametrize("context", [0, 1, 16, 100, 1000])
def test_prefill_over_a_cached_prefix_matches_reference(context) -> None:
    g = torch.Generator(device=CUDA).manual_seed(context)
    heads, dim, block_size, new = 8, 128, 16, 37
    total = context + new
    key_cache, value_cache = _random_cache(-(-total // block_size) + 4, block_size, heads, dim, torch.float16, g)
    table = _block_tables([total], block_size, -(-total // block_size) + 2, key_cache.shape[0], g)
    qkv = torch.randn(new, 3 * heads * dim, device=CUDA, generator=g).to(torch.float16)
    q, k, v = (t.view(new, heads, dim) for t in qkv.chunk(3, dim=-1))
    positions = torch.arange(context, total, device=CUDA)
    slots = table[0, positions // block_size].long() * block_size + positions % block_size
    ops.write_kv_cache(k, v, key_cache, value_cache, slots)
    actual = ops.prefill_attention(q, k, v, key_cache, value_cache, table[0], context, dim**-0.5)
    expected = ops.paged_attention_reference(q, key_cache, value_cache, table, (new,), (context,), dim**-0.5)
    _assert_close(actual, expected, torch.float16)


def test_bad_inputs_get_clear_errors() -> None:
    query, key_cache, value_cache, tables, seq_lens = _decode_case([5], 16, 4, 64, torch.float16, 0)
    with pytest.raises(ValueError, match="disagree"):
        ops.paged_attention_decode(query, key_cache, value_cache, tables, seq_lens[:0], 1.0)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        ops.paged_attention_decode(query.float(), key_cache.float(), value_cache.float(), tables, seq_lens, 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.paged_attention_decode(query, key_cache.bfloat16(), value_cache.bfloat16(), tables, seq_lens, 1.0)
    assert math.isfinite(float(ops.paged_attention_decode(query, key_cache, value_cache, tables, seq_lens, 1.0).sum()))
