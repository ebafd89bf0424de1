"""The int8 KV cache on the GPU: the write kernel bit for bit against its reference (quantize_per_token
of every (token, head) row), decode attention over int8 caches against the float32 reference over the
dequantized cache, prefill over an int8 prefix, and a CUDA-graph replay. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from engine import ops
from tests.test_attention_gpu import CONTEXTS, CUDA, _assert_close, _block_tables
from tests.test_attention_gpu import _decode_case as attention_decode_case

pytestmark = pytest.mark.gpu


def _int8_cache(num_blocks: int, block_size: int, heads: int, dim: int, g: torch.Generator):
    """A random int8 cache as the write kernel leaves it: rows of int8 and one positive scale per row."""
    shape = (num_blocks, block_size, heads, dim)
    keys = torch.randint(-127, 128, shape, device=CUDA, generator=g, dtype=torch.int8)
    values = torch.randint(-127, 128, shape, device=CUDA, generator=g, dtype=torch.int8)
    key_scales = torch.rand(shape[:-1], device=CUDA, generator=g) * 0.05 + 1e-3
    value_scales = torch.rand(shape[:-1], device=CUDA, generator=g) * 0.05 + 1e-3
    return keys, values, key_scales, value_scales


def _decode_case(lens: list[int], block_size: int, heads: int, dim: int, dtype, seed: int):
    """test_attention_gpu's decode case (strided query rows, shuffled block tables), over an int8 cache."""
    query, key_cache, _, tables, seq_lens = attention_decode_case(lens, block_size, heads, dim, dtype, seed)
    cache = _int8_cache(key_cache.shape[0], block_size, heads, dim, torch.Generator(device=CUDA).manual_seed(seed))
    return query, cache, tables, seq_lens


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dim", [64, 80, 128])
def test_int8_decode_matches_reference_over_context_lengths(dtype, block_size, dim) -> None:
    for seed, context in enumerate(CONTEXTS):
        lens = [context, max(1, context // 3), 1 + (context * 7) % 97]
        query, (k, v, ks, vs), tables, seq_lens = _decode_case(lens, block_size, 8, dim, dtype, seed)
        expected = ops.paged_attention_decode_reference(query, k, v, tables, seq_lens, dim**-0.5, ks, vs)
        actual = ops.paged_attention_decode(query, k, v, tables, seq_lens, dim**-0.5, ks, vs)
        _assert_close(actual, expected, dtype)


@pytest.mark.parametrize("batch", [1, 17, 80])
def test_int8_decode_at_opt_shapes_over_partition_lengths(batch: int) -> None:
    """OPT-13B's 40 heads of 128, batches that pick short and long partitions, a length-0 padding row."""
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(1, 1500, (batch,), generator=g).tolist()
    lens[0] = 1499
    if batch > 1:
        lens[1] = 0
    query, (k, v, ks, vs), tables, seq_lens = _decode_case(lens, 16, 40, 128, torch.float16, batch)
    actual = ops.paged_attention_decode(query, k, v, tables, seq_lens, 128**-0.5, ks, vs)
    expected = ops.paged_attention_decode_reference(query, k, v, tables, seq_lens, 128**-0.5, ks, vs)
    _assert_close(actual, expected, torch.float16)
    if batch > 1:
        assert actual[1].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("dim", [64, 80, 128])
def test_int8_write_is_bit_exact_and_skips_padding(dtype, dim) -> None:
    g = torch.Generator(device=CUDA).manual_seed(dim)
    heads, tokens, num_blocks, block_size = 12, 77, 20, 16
    qkv = torch.randn(tokens, 3 * heads * dim, device=CUDA, generator=g).to(dtype) * 3
    key = qkv[:, heads * dim : 2 * heads * dim].view(tokens, heads, dim)
    value = qkv[:, 2 * heads * dim :].view(tokens, heads, dim)
    value[3, 5] = 0  # an all-zero row: the minimum scale, zeros
    k, v, ks, vs = _int8_cache(num_blocks, block_size, heads, dim, g)
    slots = torch.randperm(num_blocks * block_size, device=CUDA, generator=g)[:tokens]
    slots[::5] = -1
    expected_cpu = [t.cpu() for t in (k, v, ks, vs)]  # the reference writes into copies on the CPU
    ops.write_kv_cache(key.cpu(), value.cpu(), expected_cpu[0], expected_cpu[1], slots.cpu(), expected_cpu[2],
                       expected_cpu[3])  # fmt: skip
    ops.write_kv_cache(key, value, k, v, slots, ks, vs)
    for actual, want in zip((k, v, ks, vs), expected_cpu, strict=True):
        assert torch.equal(actual.cpu(), want)


@pytest.mark.parametrize("context", [0, 1, 16, 100, 1000])
def test_prefill_over_an_int8_prefix_matches_reference(context) -> None:
    g = torch.Generator(device=CUDA).manual_seed(context)
    heads, dim, block_size, new = 8, 128, 16, 37
    total = context + new
    k_cache, v_cache, ks, vs = _int8_cache(-(-total // block_size) + 4, block_size, heads, dim, g)
    table = _block_tables([total], block_size, -(-total // block_size) + 2, k_cache.shape[0], g)
    qkv = torch.randn(new, 3 * heads * dim, device=CUDA, generator=g).to(torch.float16)
    q, k, v = (t.view(new, heads, dim) for t in qkv.chunk(3, dim=-1))
    positions = torch.arange(context, total, device=CUDA)
    slots = table[0, positions // block_size].long() * block_size + positions % block_size
    ops.write_kv_cache(k, v, k_cache, v_cache, slots, ks, vs)
    actual = ops.prefill_attention(q, k, v, k_cache, v_cache, table[0], context, dim**-0.5, ks, vs)
    if context == 0:  # the first chunk attends to its own fresh keys, not the cache
        expected = ops.paged_attention_reference(q, *_single_block(k, v), (new,), (0,), dim**-0.5)
    else:
        # Prefill dequantizes the prefix to the query's dtype (one fp16 rounding of each key and value)
        # before its fp16 attention: the reference gets the same fp16 keys and values.
        k16, v16 = ops.dequantize_kv(k_cache, ks, torch.float16), ops.dequantize_kv(v_cache, vs, torch.float16)
        expected = ops.paged_attention_reference(q, k16, v16, table, (new,), (context,), dim**-0.5)
    _assert_close(actual, expected, torch.float16)


def _single_block(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh keys and values [n, H, D] as a one-block cache and its table."""
    return k[None], v[None], torch.zeros((1, 1), dtype=torch.int32, device=k.device)


def test_int8_decode_replays_in_a_cuda_graph_with_new_lengths() -> None:
    query, (k, v, ks, vs), tables, seq_lens = _decode_case([10, 600, 1500], 16, 8, 128, torch.float16, 3)
    static_lens = seq_lens.clone()
    ops.paged_attention_decode(query, k, v, tables, static_lens, 0.1, ks, vs)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.paged_attention_decode(query, k, v, tables, static_lens, 0.1, ks, vs)
    for new_lens in ([10, 600, 1500], [1, 513, 1024], [0, 50, 1]):
        static_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        expected = ops.paged_attention_decode_reference(query, k, v, tables, static_lens, 0.1, ks, vs)
        _assert_close(out, expected, torch.float16)


def test_int8_cache_needs_its_scales() -> None:
    query, (k, v, ks, vs), tables, seq_lens = _decode_case([5], 16, 4, 64, torch.float16, 0)
    with pytest.raises(ValueError, match="needs key and value scales"):
        ops.paged_attention_decode(query, k, v, tables, seq_lens, 1.0)
    with pytest.raises(ValueError, match="only an int8 cache takes them"):
        ops.paged_attention_decode(query, k.half(), v.half(), tables, seq_lens, 1.0, ks, vs)
    with pytest.raises(RuntimeError, match="scales must be contiguous float32"):
        ops.paged_attention_decode(query, k, v, tables, seq_lens, 1.0, ks.half(), vs.half())
