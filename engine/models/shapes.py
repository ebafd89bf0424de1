"""The public OPT shapes (Zhang et al., 2022, Table 1 and the released configs), plus tiny test shapes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OPTShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    vocab_size: int | None = 50272  # None: take the tokenizer's vocabulary size
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None  # None: same as hidden_size
    do_layer_norm_before: bool = True

    def to_hf_config(self, vocab_size: int) -> dict[str, object]:
        return {
            "model_type": "opt",
            "architectures": ["OPTForCausalLM"],
            "vocab_size": self.vocab_size or vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "ffn_dim": self.ffn_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "word_embed_proj_dim": self.word_embed_proj_dim or self.hidden_size,
            "do_layer_norm_before": self.do_layer_norm_before,
            "activation_function": "relu",
            "enable_bias": True,
            "layer_norm_elementwise_affine": True,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
            "layerdrop": 0.0,
            "init_std": 0.02,
            "pad_token_id": 1,
            "bos_token_id": 2,
            "eos_token_id": 2,
        }


OPT_SHAPES: dict[str, OPTShape] = {
    "opt-125m": OPTShape(768, 12, 12, 3072),
    "opt-350m": OPTShape(1024, 24, 16, 4096, word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": OPTShape(2048, 24, 32, 8192),
    "opt-2.7b": OPTShape(2560, 32, 32, 10240),
    "opt-6.7b": OPTShape(4096, 32, 32, 16384),
    "opt-13b": OPTShape(5120, 40, 40, 20480),
    "opt-30b": OPTShape(7168, 48, 56, 28672),
    "opt-66b": OPTShape(9216, 64, 72, 36864),
    "opt-175b": OPTShape(12288, 96, 96, 49152),
    # Small enough to train on a CPU in a minute; vocabulary sized by the trained tokenizer.
    "tiny": OPTShape(128, 4, 4, 512, vocab_size=None, max_position_embeddings=512),
    # OPT-350m's layout in miniature: post-LN, token embeddings narrower than the hidden size.
    "tiny-post-ln": OPTShape(
        128, 4, 4, 512, vocab_size=None, max_position_embeddings=512, word_embed_proj_dim=64, do_layer_norm_before=False
    ),
}
