"""Quantization is a layer swap: W8A8Linear replaces nn.Linear in every decoder layer.

Per layer: q/k/v (fused), out_proj, fc1 (with the ReLU fused into its epilogue) and fc2 become
W8A8Linear. In pre-LN models the LayerNorms in front of q/k/v and fc1 feed nothing else, so they
become QuantizingLayerNorms that hand int8 activations straight to the GEMM. Embeddings, the final
LayerNorm and the LM head stay in floating point.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.config import ActivationQuant, QuantConfig
from engine.errors import QuantizationError
from engine.layers.layernorm import QuantizingLayerNorm
from engine.layers.linear import W8A8Linear
from engine.models.opt import OPTDecoderLayer, OPTForCausalLM
from engine.quant.smooth import smooth_model
from engine.quant.stats import ActivationStats

# (linear, its module path within the layer, the LayerNorm that feeds it in pre-LN blocks)
MakeLinear = Callable[[str, nn.Linear, "ActivationQuant | None", bool], nn.Module]
MakeNorm = Callable[[str, nn.LayerNorm, ActivationQuant], nn.Module]


def _swap_layers(model: OPTForCausalLM, quant: QuantConfig, make_linear: MakeLinear, make_norm: MakeNorm) -> None:
    act_quant = quant.activation_quant
    for index, layer in enumerate(model.decoder.layers):
        layer: OPTDecoderLayer
        prefix = f"decoder.layers.{index}"
        attn = layer.self_attn
        # In pre-LN blocks the LayerNorm quantizes, so q/k/v and fc1 receive int8 input (act_quant None).
        fed_quantized = layer.pre_layer_norm
        upstream = None if fed_quantized else act_quant
        attn.qkv_proj = make_linear(f"{prefix}.self_attn.qkv_proj", attn.qkv_proj, upstream, False)
        attn.out_proj = make_linear(f"{prefix}.self_attn.out_proj", attn.out_proj, act_quant, False)
        layer.fc1 = make_linear(f"{prefix}.fc1", layer.fc1, upstream, True)
        layer.activation = nn.Identity()  # fused into fc1's epilogue
        layer.fc2 = make_linear(f"{prefix}.fc2", layer.fc2, act_quant, False)
        if fed_quantized:
            layer.self_attn_layer_norm = make_norm(
                f"{prefix}.self_attn.qkv_proj", layer.self_attn_layer_norm, act_quant
            )
            layer.final_layer_norm = make_norm(f"{prefix}.fc1", layer.final_layer_norm, act_quant)


def apply_w8a8_layout(model: OPTForCausalLM, quant: QuantConfig) -> None:
    """Give the model the W8A8 module layout with uninitialized tensors (to load a W8A8 checkpoint into)."""

    def make_linear(_name: str, linear: nn.Linear, act_quant: ActivationQuant | None, relu: bool) -> nn.Module:
        return W8A8Linear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            act_quant=act_quant,
            weight_granularity=quant.weight_granularity,
            fuse_relu=relu,
            bias_dtype=linear.weight.dtype,
            device=linear.weight.device,
        )

    def make_norm(_name: str, layer_norm: nn.LayerNorm, act_quant: ActivationQuant) -> nn.Module:
        affine = layer_norm.weight is not None
        return QuantizingLayerNorm(
            layer_norm.normalized_shape[0],
            eps=layer_norm.eps,
            act_quant=act_quant,
            elementwise_affine=affine,
            dtype=layer_norm.weight.dtype if affine else torch.float32,
            device=layer_norm.weight.device if affine else None,
        )

    _swap_layers(model, quant, make_linear, make_norm)


@torch.no_grad()
def quantize_model(model: OPTForCausalLM, quant: QuantConfig, stats: ActivationStats | None) -> None:
    """Swap the float layers for W8A8 ones in place. `stats` must describe the model as it is now
    (after smoothing, if it was smoothed); they are needed for static (O3) scales."""
    static = quant.activation_quant == "per_tensor_static"
    if static and stats is None:
        raise QuantizationError("O3 (static activation scales) needs calibration statistics")

    def scale_of(name: str) -> torch.Tensor | None:
        return stats.static_scale(name) if static and stats is not None else None

    def make_linear(name: str, linear: nn.Linear, act_quant: ActivationQuant | None, relu: bool) -> nn.Module:
        return W8A8Linear.from_float(
            linear,
            act_quant=act_quant,
            weight_granularity=quant.weight_granularity,
            input_scale=scale_of(name) if act_quant is not None else None,
            fuse_relu=relu,
        )

    def make_norm(name: str, layer_norm: nn.LayerNorm, act_quant: ActivationQuant) -> nn.Module:
        return QuantizingLayerNorm.from_float(layer_norm, act_quant=act_quant, output_scale=scale_of(name))

    _swap_layers(model, quant, make_linear, make_norm)


def smoothquant(model: OPTForCausalLM, quant: QuantConfig, stats: ActivationStats | None) -> None:
    """The whole recipe in place: smooth with `quant.alpha` (unless naive), then quantize at `quant.level`."""
    if quant.smoothed:
        if stats is None:
            raise QuantizationError("smoothing needs calibration statistics")
        stats = stats.divided(smooth_model(model, stats, quant.alpha))
    quantize_model(model, quant, stats)
    chain_static_requantization(model)


def chain_static_requantization(model: OPTForCausalLM) -> int:
    """Where fc2 quantizes its input with a static scale (O3), let fc1's GEMM write that int8 input
    itself (its epilogue requantizes by fc2's scale): one fp16 round trip less per layer. Call after the
    weights are in place; returns the number of layers chained."""
    chained = 0
    for layer in model.decoder.layers:
        fc1, fc2 = layer.fc1, layer.fc2
        static_fc2 = isinstance(fc2, W8A8Linear) and fc2.act_quant == "per_tensor_static"
        if isinstance(fc1, W8A8Linear) and static_fc2 and isinstance(layer.activation, nn.Identity):
            fc1.requantize_scale = fc2.input_scale
            chained += 1
    return chained
