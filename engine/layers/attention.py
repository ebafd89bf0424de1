"""Causal multi-head attention over a flattened batch of sequences.

The model always sees a flattened batch: the new tokens of every sequence laid end to end, shape
[T, ...]. `AttentionMetadata` says where each sequence starts and how long it is, so the same model
code serves a no-cache forward (calibration, evaluation: every sequence attends to itself only) and,
with the paged KV cache fields the engine adds, prefill and decode against cached context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine import ops


@dataclass(frozen=True)
class PagedKVCache:
    """One layer's paged KV cache: keys and values [num_blocks, block_size, num_heads, head_dim].

    In the model's dtype, or int8 (`kv_cache_dtype="int8"`): each (token, head) row quantized by its own
    float32 scale, kept in key_scales / value_scales [num_blocks, block_size, num_heads]. Per-row scales
    need no calibration and follow outlier heads; they add 4 bytes per 128-byte row of a 128-dim head.
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None

    @classmethod
    def allocate(cls, num_blocks: int, block_size: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, quantized: bool) -> PagedKVCache:  # fmt: skip
        shape = (num_blocks, block_size, num_heads, head_dim)
        if not quantized:
            return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        scales = shape[:-1]
        return cls(
            torch.zeros(shape, dtype=torch.int8, device=device),
            torch.zeros(shape, dtype=torch.int8, device=device),
            torch.ones(scales, dtype=torch.float32, device=device),
            torch.ones(scales, dtype=torch.float32, device=device),
        )

    @staticmethod
    def bytes_per_token(num_heads: int, head_dim: int, dtype: torch.dtype, quantized: bool) -> int:
        """Bytes one token takes in one layer (keys and values, with their scales when int8)."""
        if quantized:
            return 2 * num_heads * (head_dim + 4)
        return 2 * num_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.key_scales, self.value_scales)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True)
class AttentionMetadata:
    """Describes the flattened batch.

    seq_lens[i] is the number of new tokens of sequence i; they occupy rows
    [sum(seq_lens[:i]), sum(seq_lens[:i+1])) of every [T, ...] tensor.

    With a paged KV cache (set by the model runner), sequence i also has context_lens[i] tokens cached
    before this step; its new tokens are written to the cache slots `slot_mapping` (block * block_size
    + offset; -1 for a padding row) and attend to all context_lens[i] + seq_lens[i] tokens through
    block_tables[i].

    The model runner puts single-token sequences (decodes) first: the first `num_decodes` sequences have
    one new token each and run as one batched decode kernel, whose lengths (context + 1) are the device
    tensor `decode_seq_lens`, so a decode step needs no host values and can be a CUDA graph.
    """

    seq_lens: tuple[int, ...]
    context_lens: tuple[int, ...] | None = None
    slot_mapping: torch.Tensor | None = None  # int64 [T]
    block_tables: torch.Tensor | None = None  # int32 [B, max_blocks], padded with 0
    num_decodes: int = 0
    decode_seq_lens: torch.Tensor | None = None  # int32 [num_decodes]

    @property
    def uses_kv_cache(self) -> bool:
        return self.slot_mapping is not None

    @classmethod
    def no_cache(cls, seq_lens: list[int] | tuple[int, ...]) -> AttentionMetadata:
        if not seq_lens or min(seq_lens) < 1:
            raise ValueError(f"every sequence needs at least one token, got lengths {list(seq_lens)}")
        return cls(seq_lens=tuple(int(n) for n in seq_lens))

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)


class Attention(nn.Module):
    """softmax(q k^T * scale + causal mask) v, per sequence and per head."""

    def __init__(self, num_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.kv_cache: PagedKVCache | None = None  # bound by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        # q, k, v: [T, num_heads * head_dim] -> out: [T, num_heads * head_dim]
        num_tokens = q.shape[0]
        if num_tokens != metadata.num_tokens:
            raise ValueError(f"batch has {num_tokens} tokens but the metadata describes {metadata.num_tokens}")
        if metadata.uses_kv_cache:
            return self._paged(q, k, v, metadata)
        lens = metadata.seq_lens
        if all(n == lens[0] for n in lens):  # equal lengths: one batched call
            return self._causal(q, k, v, batch=len(lens), seq_len=lens[0])
        outputs = [
            self._causal(qs, ks, vs, batch=1, seq_len=n)
            for qs, ks, vs, n in zip(q.split(lens), k.split(lens), v.split(lens), lens, strict=True)
        ]
        return torch.cat(outputs)

    def _paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("attention metadata asks for the KV cache, but none is bound to this layer")
        if metadata.block_tables is None or metadata.context_lens is None:
            raise ValueError("paged attention needs block tables and context lengths")
        cache = self.kv_cache
        caches = (cache.keys, cache.values)
        scales = (cache.key_scales, cache.value_scales)
        shape = (-1, self.num_heads, self.head_dim)
        q, k, v = q.view(shape), k.view(shape), v.view(shape)
        # Every new token's K/V is written before any attention reads the cache (the prefix cache relies on it).
        ops.write_kv_cache(k, v, *caches, metadata.slot_mapping, *scales)
        outputs = []
        decodes = metadata.num_decodes
        if decodes:
            if metadata.decode_seq_lens is None:
                raise ValueError("decode rows need decode_seq_lens")
            # The CUDA kernel takes fp16/bf16 and a few head dims and refuses the rest; a float32 model on a
            # GPU (or an odd head dim) decodes through the reference, which has no host sync either.
            kernel_fits = ops.decode_kernel_supports(q.dtype, self.head_dim)
            decode = ops.paged_attention_decode if kernel_fits else ops.paged_attention_decode_reference
            outputs.append(decode(
                q[:decodes], *caches, metadata.block_tables[:decodes], metadata.decode_seq_lens, self.scale, *scales
            ))  # fmt: skip
        start = decodes
        for index in range(decodes, len(metadata.seq_lens)):
            end = start + metadata.seq_lens[index]
            outputs.append(ops.prefill_attention(
                q[start:end], k[start:end], v[start:end], *caches, metadata.block_tables[index],
                metadata.context_lens[index], self.scale, *scales,
            ))  # fmt: skip
            start = end
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
        def heads(x: torch.Tensor) -> torch.Tensor:  # [B*L, nh*hd] -> [B, nh, L, hd]
            return x.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True, scale=self.scale)
        return out.transpose(1, 2).reshape(batch * seq_len, self.num_heads * self.head_dim)
