"""OPT (Zhang et al., 2022): a decoder-only transformer with learned positions and ReLU FFNs.

Every public shape is served, 125m to 175b, including OPT-350m, which normalizes after each block
(post-LN) and embeds tokens in 512 dimensions with `project_in` / `project_out` around the decoder.

The model works on a flattened batch: input ids and positions of shape [T] (all sequences' new tokens
end to end), hidden states [T, hidden]. `AttentionMetadata` describes the sequences. q/k/v are one
fused Linear (`qkv_proj`), so a W8A8 model quantizes the LayerNorm output once and runs one GEMM.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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


class OPTAttention(nn.Module):
    def __init__(self, arch: OPTArchitecture) -> None:
        super().__init__()
        hidden = arch.hidden_size
        self.qkv_proj = nn.Linear(hidden, 3 * hidden, bias=arch.enable_bias)
        self.out_proj = nn.Linear(hidden, hidden, bias=arch.enable_bias)
        self.attn = Attention(arch.num_heads, arch.head_dim, scale=arch.head_dim**-0.5)

    def forward(self, x: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)  # [T, 3H] -> 3 x [T, H]
        return self.out_proj(self.attn(q, k, v, metadata))


class OPTDecoderLayer(nn.Module):
    def __init__(self, arch: OPTArchitecture) -> None:
        super().__init__()
        affine = arch.layer_norm_elementwise_affine
        self.pre_layer_norm = arch.do_layer_norm_before
        self.self_attn_layer_norm = LayerNorm(arch.hidden_size, elementwise_affine=affine)
        self.self_attn = OPTAttention(arch)
        self.final_layer_norm = LayerNorm(arch.hidden_size, elementwise_affine=affine)
        self.fc1 = nn.Linear(arch.hidden_size, arch.ffn_dim, bias=arch.enable_bias)
        self.activation: nn.Module = nn.ReLU()  # becomes Identity when W8A8 fc1 fuses the ReLU
        self.fc2 = nn.Linear(arch.ffn_dim, arch.hidden_size, bias=arch.enable_bias)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))

    def forward(self, x: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        if self.pre_layer_norm:  # 125m, 1.3b ... 175b
            x, normed = self.final_layer_norm.add_and_norm(x, self.self_attn(self.self_attn_layer_norm(x), metadata))
            return x + self.mlp(normed)
        # 350m: normalize after each residual add
        x = self.self_attn_layer_norm(x + self.self_attn(x, metadata))
        return self.final_layer_norm(x + self.mlp(x))


class OPTDecoder(nn.Module):
    def __init__(self, arch: OPTArchitecture) -> None:
        super().__init__()
        hidden, embed_dim = arch.hidden_size, arch.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(arch.vocab_size, embed_dim)
        self.embed_positions = nn.Embedding(arch.max_position_embeddings + POSITION_OFFSET, hidden)
        projected = embed_dim != hidden
        self.project_in = nn.Linear(embed_dim, hidden, bias=False) if projected else None
        self.project_out = nn.Linear(hidden, embed_dim, bias=False) if projected else None
        self.layers = nn.ModuleList(OPTDecoderLayer(arch) for _ in range(arch.num_layers))
        affine = arch.layer_norm_elementwise_affine
        self.final_layer_norm = LayerNorm(hidden, elementwise_affine=affine) if arch.has_final_layer_norm else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, embed_dim]
        if self.project_in is not None:
            x = self.project_in(x)  # [T, hidden]
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            x = layer(x, metadata)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # [T, embed_dim]
        return x


class OPTForCausalLM(nn.Module):
    """The decoder plus a language-model head tied to the token embedding."""

    def __init__(self, arch: OPTArchitecture) -> None:
        super().__init__()
        self.arch = arch
        self.decoder = OPTDecoder(arch)

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, word_embed_proj_dim]."""
        return self.decoder(input_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.decoder.embed_tokens.weight)  # [T, vocab]

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
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
        """Copy checkpoint tensors into this model's parameters and buffers (casting dtypes).

        Accepts Hugging Face names (`model.decoder.layers.0.self_attn.q_proj.weight`, or without the
        `model.` prefix as in the original OPT files) and smoothserve's own names. Returns, per
        state-dict entry, how many elements were written, so the caller can check completeness.
        """
        targets = self.state_dict(keep_vars=True)
        written: dict[str, int] = {}
        for name, tensor in weights:
            for target_name, rows in _checkpoint_name_to_targets(name, self.arch.hidden_size):
                if target_name not in targets:
                    raise ModelLoadError(f"checkpoint tensor {name!r} does not belong to this OPT model")
                destination = targets[target_name]
                destination = destination.data if isinstance(destination, nn.Parameter) else destination
                if rows is not None:
                    destination = destination[rows]
                if tuple(destination.shape) != tuple(tensor.shape):
                    raise ModelLoadError(
                        f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(destination.shape)}"
                    )
                destination.copy_(tensor)
                written[target_name] = written.get(target_name, 0) + tensor.numel()
        return written

    def missing_weights(self, written: dict[str, int]) -> list[str]:
        return [name for name, t in self.state_dict().items() if written.get(name, 0) != t.numel()]


def _checkpoint_name_to_targets(name: str, hidden: int) -> Iterator[tuple[str, slice | None]]:
    """Map one checkpoint name to (state-dict name, row slice) pairs; the tied lm_head maps to none."""
    if name.startswith("model."):
        name = name[len("model.") :]
    if name == "lm_head.weight":
        return  # tied to decoder.embed_tokens.weight
    for slot, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        marker = f".self_attn.{proj}."
        if marker in name:
            yield name.replace(marker, ".self_attn.qkv_proj."), slice(slot * hidden, (slot + 1) * hidden)
            return
    yield name, None
