"""Which part of every checkpoint tensor a tensor-parallel rank holds.

Megatron-LM's split of a transformer block, for OPT:
- column-parallel (output features split): q/k/v (whole heads) and fc1; their bias and per-channel
  weight scales split with the rows. The fused qkv_proj of rank r is [q_r; k_r; v_r]: rows
  [slot * H + r * H/N, slot * H + (r + 1) * H/N) of each of the three slots of the full [3H, H].
- row-parallel (input features split): out_proj and fc2. Every rank adds a partial product, summed by
  an all-reduce; the bias is added once, by rank 0 (the other ranks hold zeros). Their per-channel
  weight scales are per *output* channel, so every rank holds them whole.
- vocabulary-parallel: the token embedding (and the LM head tied to it), split by rows after padding
  the vocabulary to a multiple of N; padding rows are zeros and their logits are dropped.
- everything else (LayerNorms, positions, OPT-350m's projections, per-tensor and static activation
  scales) is replicated: per-tensor and static scales were computed on the whole tensor.

`checkpoint_pieces` maps a checkpoint tensor to the (target, rows, source index) pieces this rank
reads, so the loader reads only the rank's slice from the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.models.opt import OPTArchitecture

COLUMN_PARALLEL = ("qkv_proj", "fc1")
ROW_PARALLEL = ("out_proj", "fc2")
EMBEDDING = "decoder.embed_tokens.weight"
QKV_SLOTS = ("q_proj", "k_proj", "v_proj")
EVERYTHING: tuple[slice, ...] = ()  # an index that selects the whole tensor


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of a tensor-parallel group of `world_size`."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside a tensor-parallel group of {self.world_size}")

    def part(self, size: int, what: str) -> int:
        """This rank's share of `size`, which must divide evenly."""
        if size % self.world_size:
            raise ConfigError(f"{what} ({size}) is not divisible by the tensor-parallel size {self.world_size}")
        return size // self.world_size

    def rows(self, size: int) -> slice:
        local = size // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    def padded_vocab(self, vocab_size: int) -> int:
        return -(-vocab_size // self.world_size) * self.world_size

    def vocab_rows(self, vocab_size: int) -> tuple[int, int]:
        """[start, stop) of the token ids whose embedding rows this rank holds (stop may pass vocab_size)."""
        local = self.padded_vocab(vocab_size) // self.world_size
        return self.rank * local, (self.rank + 1) * local


UNSHARDED = Shard()  # the whole model in one process


@dataclass(frozen=True)
class Piece:
    """Write `source` (an index into the checkpoint tensor; None: zeros) into rows `rows` of `target`."""

    target: str  # state-dict name
    rows: slice | None  # None: the whole target
    source: tuple[slice, ...] | None


def _splits_output(param: str, shape: tuple[int, ...]) -> bool:
    # weight, bias, and per-channel weight scales follow the output rows; a [1] scale is global.
    return param in ("weight", "bias") or (param == "weight_scale" and shape[0] > 1)


def checkpoint_pieces(name: str, shape: tuple[int, ...], arch: OPTArchitecture, shard: Shard) -> list[Piece]:
    """The pieces of checkpoint tensor `name` (Hugging Face, original OPT or smoothserve naming) that this
    rank holds; none for the LM head, which is tied to the token embedding."""
    if name.startswith("model."):
        name = name[len("model.") :]
    if name == "lm_head.weight":
        return []
    hidden = arch.hidden_size
    local_hidden = hidden // shard.world_size
    for slot, proj in enumerate(QKV_SLOTS):  # separate q/k/v (Hugging Face) -> one slot of the fused qkv_proj
        marker = f".self_attn.{proj}."
        if marker in name:
            rows = slice(slot * local_hidden, (slot + 1) * local_hidden)
            return [Piece(name.replace(marker, ".self_attn.qkv_proj."), rows, (shard.rows(hidden),))]
    if shard.world_size == 1:
        return [Piece(name, None, EVERYTHING)]
    module, _, param = name.rpartition(".")
    kind = module.rpartition(".")[2]
    if kind == "qkv_proj" and _splits_output(param, shape):
        return [
            Piece(name, slice(slot * local_hidden, (slot + 1) * local_hidden),
                  (slice(slot * hidden + shard.rank * local_hidden, slot * hidden + (shard.rank + 1) * local_hidden),))
            for slot in range(len(QKV_SLOTS))
        ]  # fmt: skip
    if kind == "fc1" and _splits_output(param, shape):
        return [Piece(name, None, (shard.rows(shape[0]),))]
    if kind in ROW_PARALLEL and param == "weight":
        return [Piece(name, None, (slice(None), shard.rows(shape[1])))]
    if kind in ROW_PARALLEL and param == "bias" and shard.rank > 0:
        return [Piece(name, None, None)]  # added once, after the all-reduce, by rank 0's share
    if name == EMBEDDING:
        start, stop = shard.vocab_rows(shape[0])
        real = max(0, min(stop, shape[0]) - start)  # rows of real tokens; the rest is padding
        pieces = [Piece(name, slice(0, real), (slice(start, start + real),))] if real else []
        if real < stop - start:
            pieces.append(Piece(name, slice(real, stop - start), None))
        return pieces
    return [Piece(name, None, EVERYTHING)]


def check_divisible(arch: OPTArchitecture, shard: Shard) -> None:
    """Fail early, with the reason, for a model that cannot be split `shard.world_size` ways."""
    shard.part(arch.num_heads, "the number of attention heads")
    shard.part(arch.ffn_dim, "the FFN dimension (ffn_dim)")
