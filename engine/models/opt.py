"""OPT (Zhang et al., 2022): a decoder-only transformer with learned positions and ReLU FFNs.

Every public shape is served, 125m to 175b, including OPT-350m, which normalizes after each block
(post-LN) and embeds tokens in 512 dimensions with `project_in` / `project_out` around the decoder.

The model works on a flattened batch: input ids and positions of shape [T] (all sequences' new tokens
end to end), hidden states [T, hidden]. `AttentionMetadata` describes the sequences. q/k/v are one
fused Linear (`qkv_proj`), so a W8A8 model quantizes the LayerNorm output once and runs one GEMM.

Under tensor parallelism (`shard`, see engine/distributed/sharding.py) a rank builds its share: its
heads in qkv_proj and out_proj, its part of the FFN in fc1 and fc2, its rows of the vocabulary; the
outputs of out_proj and fc2 (partial sums) and of the embedding are all-reduced.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed.layers import VocabParallelEmbedding
from engine.distributed.parallel_state import all_gather, all_reduce
from engine.distributed.sharding import UNSHARDED, Shard, check_divisible, checkpoint_pieces
from engine.errors import ModelLoadError
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.layernorm import LayerNorm

# OPT's learned position table has two extra rows in front (a fairseq legacy of its padding index).
POSITION_OFFSET = 2


@dataclass(frozen=True)
class OPTArchitecture:
    """The shape of an OPT model, read from a Hugging Face `config.json`."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    max_position_embeddings: int
    word_embed_proj_dim: int
    do_layer_norm_before: bool = True
    has_final_layer_norm: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> OPTArchitecture:
        model_type = config.get("model_type")
        if model_type != "opt":
            raise ModelLoadError(f"not an OPT model: config.json has model_type={model_type!r}, expected 'opt'")
        activation = config.get("activation_function", "relu")
        if activation != "relu":
            raise ModelLoadError(f"OPT models use ReLU; this config asks for {activation!r}")
        try:
            hidden = int(config["hidden_size"])
            arch = cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(config["num_hidden_layers"]),
                num_heads=int(config["num_attention_heads"]),
                ffn_dim=int(config["ffn_dim"]),
                max_position_embeddings=int(config["max_position_embeddings"]),
                word_embed_proj_dim=int(config.get("word_embed_proj_dim") or hidden),
                do_layer_norm_before=bool(config.get("do_layer_norm_before", True)),
                # Only pre-LN models have a final LayerNorm; `_remove_final_layer_norm` marks old fine-tunes.
                has_final_layer_norm=bool(config.get("do_layer_norm_before", True))
                and not config.get("_remove_final_layer_norm", False),
                enable_bias=bool(config.get("enable_bias", True)),
                layer_norm_elementwise_affine=bool(config.get("layer_norm_elementwise_affine", True)),
                pad_token_id=int(config.get("pad_token_id", 1)),
                bos_token_id=int(config.get("bos_token_id", 2)),
                eos_token_id=int(config.get("eos_token_id", 2)),
            )
        except KeyError as missing:
            raise ModelLoadError(f"OPT config.json lacks the field {missing}") from None
        if hidden % arch.num_heads:
            raise ModelLoadError(f"hidden_size {hidden} is not divisible by num_attention_heads {arch.num_heads}")
        return arch


class TensorSource(Protocol):
    """A checkpoint tensor, read (only the part asked for) when indexed: a tensor or a safetensors slice."""

    @property
    def shape(self) -> tuple[int, ...] | torch.Size: ...

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor: ...


class OPTAttention(nn.Module):
    def __init__(self, arch: OPTArchitecture, shard: Shard = UNSHARDED) -> None:
        super().__init__()
        heads = shard.part(arch.num_heads, "the number of attention heads")  # this rank's heads
        hidden, local = arch.hidden_size, heads * arch.head_dim
        self.qkv_proj = nn.Linear(hidden, 3 * local, bias=arch.enable_bias)  # column-parallel: [q_r; k_r; v_r]
        self.out_proj = nn.Linear(local, hidden, bias=arch.enable_bias)  # row-parallel
        self.attn = Attention(heads, arch.head_dim, scale=arch.head_dim**-0.5)
        self.sharded = shard.world_size > 1

    def forward(self, x: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)  # [T, 3H/N] -> 3 x [T, H/N] (N: tensor-parallel ranks)
        out = self.out_proj(self.attn(q, k, v, metadata))
        return all_reduce(out) if self.sharded else out  # partial sums over the ranks' heads


class OPTDecoderLayer(nn.Module):
    def __init__(self, arch: OPTArchitecture, shard: Shard = UNSHARDED) -> None:
        super().__init__()
        affine = arch.layer_norm_elementwise_affine
        self.pre_layer_norm = arch.do_layer_norm_before
        self.self_attn_layer_norm = LayerNorm(arch.hidden_size, elementwise_affine=affine)
        self.self_attn = OPTAttention(arch, shard)
        self.final_layer_norm = LayerNorm(arch.hidden_size, elementwise_affine=affine)
        ffn = shard.part(arch.ffn_dim, "the FFN dimension (ffn_dim)")
        self.fc1 = nn.Linear(arch.hidden_size, ffn, bias=arch.enable_bias)  # column-parallel
        self.activation: nn.Module = nn.ReLU()  # becomes Identity when W8A8 fc1 fuses the ReLU
        self.fc2 = nn.Linear(ffn, arch.hidden_size, bias=arch.enable_bias)  # row-parallel
        # A whole model never all-reduces, even in a process that also hosts a tensor-parallel engine (whose
        # process group would otherwise make its collectives real, and wait for ranks that run another model).
        self.sharded = shard.world_size > 1

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.activation(self.fc1(x)))
        return all_reduce(out) if self.sharded else out

    def forward(
        self, x: torch.Tensor, metadata: AttentionMetadata, pending: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: the residual stream; pending: the layer before's MLP output, not yet added to it.

        Returns the same pair for the next layer. A pre-LN layer leaves its MLP output pending, so that the
        residual add runs inside the next layer's first LayerNorm (one kernel, where W8A8 quantizes too)."""
        if self.pre_layer_norm:  # 125m, 1.3b ... 175b
            if pending is None:
                normed = self.self_attn_layer_norm(x)
            else:
                x, normed = self.self_attn_layer_norm.add_and_norm(x, pending)
            x, normed = self.final_layer_norm.add_and_norm(x, self.self_attn(normed, metadata))
            return x, self.mlp(normed)
        # 350m: normalize after each residual add
        if pending is not None:
            x = x + pending
        x = self.self_attn_layer_norm(x + self.self_attn(x, metadata))
        return self.final_layer_norm(x + self.mlp(x)), None


class OPTDecoder(nn.Module):
    def __init__(self, arch: OPTArchitecture, shard: Shard = UNSHARDED) -> None:
        super().__init__()
        hidden, embed_dim = arch.hidden_size, arch.word_embed_proj_dim
        self.embed_tokens = (nn.Embedding(arch.vocab_size, embed_dim) if shard.world_size == 1
                             else VocabParallelEmbedding(arch.vocab_size, embed_dim, shard))  # fmt: skip
        self.embed_positions = nn.Embedding(arch.max_position_embeddings + POSITION_OFFSET, hidden)
        projected = embed_dim != hidden
        self.project_in = nn.Linear(embed_dim, hidden, bias=False) if projected else None
        self.project_out = nn.Linear(hidden, embed_dim, bias=False) if projected else None
        self.layers = nn.ModuleList(OPTDecoderLayer(arch, shard) for _ in range(arch.num_layers))
        affine = arch.layer_norm_elementwise_affine
        self.final_layer_norm = LayerNorm(hidden, elementwise_affine=affine) if arch.has_final_layer_norm else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, embed_dim]
        if self.project_in is not None:
            x = self.project_in(x)  # [T, hidden]
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        pending = None  # the last layer's MLP output, not yet added to the residual stream
        for layer in self.layers:
            x, pending = layer(x, metadata, pending)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x) if pending is None else self.final_layer_norm.add_and_norm(x, pending)[1]
        elif pending is not None:
            x = x + pending
        if self.project_out is not None:
            x = self.project_out(x)  # [T, embed_dim]
        return x


class OPTForCausalLM(nn.Module):
    """The decoder plus a language-model head tied to the token embedding."""

    def __init__(self, arch: OPTArchitecture, shard: Shard = UNSHARDED) -> None:
        super().__init__()
        check_divisible(arch, shard)
        self.arch = arch
        self.shard = shard
        self.decoder = OPTDecoder(arch, shard)

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, word_embed_proj_dim]."""
        return self.decoder(input_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.decoder.embed_tokens.weight)  # [T, vocab]; per rank [T, padded vocab / N]
        if self.shard.world_size == 1:
            return logits
        return all_gather(logits, dim=-1)[:, : self.arch.vocab_size]  # drop the padding columns

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """No-cache forward of equal-length sequences: [B, L] token ids -> [B, L, vocab] logits."""
        batch, seq_len = input_ids.shape
        positions = torch.arange(seq_len, device=input_ids.device).repeat(batch)
        metadata = AttentionMetadata.no_cache([seq_len] * batch)
        hidden = self(input_ids.reshape(-1), positions, metadata)
        return self.compute_logits(hidden).view(batch, seq_len, -1)

    # ----------------------------------------------------------------------------------------------
    # Weight loading

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, TensorSource]]) -> dict[str, int]:
        """Copy checkpoint tensors into this model's parameters and buffers (casting dtypes).

        Accepts Hugging Face names (`model.decoder.layers.0.self_attn.q_proj.weight`, or without the
        `model.` prefix as in the original OPT files) and smoothserve's own names. Under tensor
        parallelism only this rank's slice of each source is indexed (read). Returns, per state-dict
        entry, how many elements were written, so the caller can check completeness.
        """
        targets = self.state_dict(keep_vars=True)
        written: dict[str, int] = {}
        for name, source in weights:
            for piece in checkpoint_pieces(name, tuple(source.shape), self.arch, self.shard):
                if piece.target not in targets:
                    raise ModelLoadError(f"checkpoint tensor {name!r} does not belong to this OPT model")
                destination = targets[piece.target]
                destination = destination.data if isinstance(destination, nn.Parameter) else destination
                if piece.rows is not None:
                    destination = destination[piece.rows]
                if piece.source is None:
                    destination.zero_()
                else:
                    tensor = source[piece.source]
                    if tuple(destination.shape) != tuple(tensor.shape):
                        shard = self.shard
                        where = f" (rank {shard.rank} of {shard.world_size})" if shard.world_size > 1 else ""
                        raise ModelLoadError(
                            f"checkpoint tensor {name!r} has shape {tuple(source.shape)}, "
                            f"the model{where} expects {tuple(destination.shape)}"
                        )
                    destination.copy_(tensor)
                written[piece.target] = written.get(piece.target, 0) + destination.numel()
        return written

    def missing_weights(self, written: dict[str, int]) -> list[str]:
        return [name for name, t in self.state_dict().items() if written.get(name, 0) != t.numel()]
