"""The vocabulary-parallel token embedding; the LM head tied to it is `OPTForCausalLM.compute_logits`.

The q/k/v, out_proj, fc1 and fc2 Linears need no class of their own: a rank builds them with its
share of the features (nn.Linear, or W8A8Linear after the layer swap) and the model all-reduces the
row-parallel outputs (see `engine.distributed.sharding`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import parallel_state
from engine.distributed.sharding import Shard


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, stop) of the embedding of a vocabulary padded to a multiple of the ranks.

    A token outside this rank's rows looks up zeros; the all-reduce over the ranks then gives every
    rank the full embedding of every token.
    """

    def __init__(self, vocab_size: int, embedding_dim: int, shard: Shard) -> None:
        self.vocab_start, vocab_stop = shard.vocab_rows(vocab_size)
        super().__init__(vocab_stop - self.vocab_start, embedding_dim)
        self.vocab_size = vocab_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight)  # [T, embed_dim]
        return parallel_state.all_reduce(embedded.masked_fill_(outside.unsqueeze(-1), 0.0))

    def extra_repr(self) -> str:
        stop = self.vocab_start + self.num_embeddings
        return f"rows {self.vocab_start}..{stop} of {self.vocab_size}, {self.embedding_dim}"
