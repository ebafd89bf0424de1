"""The int8 KV cache's references on the CPU: what the write stores, how attention reads it back."""

from __future__ import annotations

import pytest
import torch

from engine import ops
from engine.layers.attention import PagedKVCache


def _cache(num_blocks: int = 6, block_size: int = 4, heads: int = 3, dim: int = 16) -> PagedKVCache:
    return PagedKVCache.allocate(num_blocks, block_size, heads, dim, torch.float32, torch.device("cpu"), quantized=True)


def test_write_stores_each_token_and_head_row_with_its_own_scale() -> None:
    g = torch.Generator().manual_seed(0)
    cache = _cache()
    key = torch.randn(5, 3, 16, generator=g) * torch.tensor([0.1, 1.0, 30.0])[None, :, None]  # heads of unlike scale
    value = torch.randn(5, 3, 16, generator=g)
    slots = torch.tensor([3, -1, 0, 17, 8])
    before = cache.keys.clone()
    ops.write_kv_cache(key, value, cache.keys, cache.values, slots, cache.key_scales, cache.value_scales)
    flat_k, flat_ks = cache.keys.view(-1, 3, 16), cache.key_scales.view(-1, 3)
    for token, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        expected_scale = key[token].abs().amax(dim=-1) / 127
        torch.testing.assert_close(flat_ks[slot], expected_scale, rtol=1e-6, atol=0)
        assert flat_k[slot].abs().amax(dim=-1).tolist() == [127, 127, 127]  # each row uses the full range
        restored = ops.dequantize_kv(flat_k[slot], flat_ks[slot], torch.float32)
        assert ((restored - key[token]).abs() <= flat_ks[slot][:, None] / 2 + 1e-6).all()  # half a step at most
    untouched = torch.ones(cache.keys.view(-1, 3, 16).shape[0], dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(flat_k[untouched], before.view(-1, 3, 16)[untouched])


def test_decode_over_an_int8_cache_is_close_to_the_float_cache() -> None:
    g = torch.Generator().manual_seed(1)
    heads, dim, block_size = 4, 32, 8
    lens = [1, 9, 30]
    float_cache = PagedKVCache.allocate(12, block_size, heads, dim, torch.float32, torch.device("cpu"), quantized=False)
    int8_cache = PagedKVCache.allocate(12, block_size, heads, dim, torch.float32, torch.device("cpu"), quantized=True)
    tables = torch.tensor([[0, 0, 0, 0], [1, 2, 0, 0], [3, 4, 5, 6]], dtype=torch.int32)
    for row, n in enumerate(lens):
        keys, values = torch.randn(n, heads, dim, generator=g), torch.randn(n, heads, dim, generator=g)
        positions = torch.arange(n)
        slots = tables[row, positions // block_size].long() * block_size + positions % block_size
        for cache in (float_cache, int8_cache):
            ops.write_kv_cache(keys, values, cache.keys, cache.values, slots, cache.key_scales, cache.value_scales)
    query = torch.randn(3, heads, dim, generator=g)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    exact = ops.paged_attention_decode(query, float_cache.keys, float_cache.values, tables, seq_lens, dim**-0.5)
    int8 = ops.paged_attention_decode(query, int8_cache.keys, int8_cache.values, tables, seq_lens, dim**-0.5,
                                      int8_cache.key_scales, int8_cache.value_scales)  # fmt: skip
    error = (int8 - exact).abs().max().item()
    assert 0 < error < 0.03  # quantized (not a copy of the float cache), and close to it
    # Prefill over the int8 prefix reads the same dequantized keys as decode.
    row = 2
    q = query[row : row + 1]
    prefill = ops.prefill_attention(q, q, q, int8_cache.keys, int8_cache.values, tables[row], lens[row] - 1,
                                    dim**-0.5, int8_cache.key_scales, int8_cache.value_scales)  # fmt: skip
    torch.testing.assert_close(prefill, int8[row : row + 1], rtol=1e-5, atol=1e-5)


def test_int8_cache_bytes_and_scale_checks() -> None:
    assert PagedKVCache.bytes_per_token(40, 128, torch.float16, quantized=False) == 2 * 40 * 128 * 2
    assert PagedKVCache.bytes_per_token(40, 128, torch.float16, quantized=True) == 2 * 40 * (128 + 4)
    cache = _cache()
    key = torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match="needs key and value scales"):
        ops.write_kv_cache(key, key, cache.keys, cache.values, torch.tensor([0]))
    assert cache.nbytes == 2 * 6 * 4 * 3 * (16 + 4)
