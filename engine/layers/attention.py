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


@dataclass(frozen=True)
class AttentionMetadata:
    """Describes the flattened batch.

    seq_lens[i] is the number of new tokens of sequence i; they occupy rows
    [sum(seq_lens[:i]), sum(seq_lens[:i+1])) of every [T, ...] tensor.
    """

    seq_lens: tuple[int, ...]

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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        # q, k, v: [T, num_heads * head_dim] -> out: [T, num_heads * head_dim]
        num_tokens = q.shape[0]
        if num_tokens != metadata.num_tokens:
            raise ValueError(f"batch has {num_tokens} tokens but the metadata describes {metadata.num_tokens}")
        lens = metadata.seq_lens
        if all(n == lens[0] for n in lens):  # equal lengths: one batched call
            return self._causal(q, k, v, batch=len(lens), seq_len=lens[0])
        outputs = [
            self._causal(qs, ks, vs, batch=1, seq_len=n)
            for qs, ks, vs, n in zip(q.split(lens), k.split(lens), v.split(lens), lens, strict=True)
        ]
        return torch.cat(outputs)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
        def heads(x: torch.Tensor) -> torch.Tensor:  # [B*L, nh*hd] -> [B, nh, L, hd]
            return x.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True, scale=self.scale)
        return out.transpose(1, 2).reshape(batch * seq_len, self.num_heads * self.head_dim)
