"""SmoothQuant's smoothing: move activation outliers into the weights, exactly preserving the function.

For a LayerNorm feeding Linears with weights W (input channels j):
    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)
    X <- X / s   (folded into the LayerNorm's weight and bias)
    W <- W * s   (along the input dimension)
so X W^T is unchanged while X's outlier channels shrink.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.errors import QuantizationError
from engine.models.opt import OPTForCausalLM
from engine.quant.stats import ActivationStats

# Floors from the SmoothQuant reference: keep s finite and non-zero for dead channels.
_MIN_ABSMAX = 1e-5


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] for one LayerNorm: activations' per-channel absmax and the weights it feeds ([N_i, K] each)."""
    weight_absmax = torch.stack([w.detach().abs().float().amax(dim=0) for w in weights]).amax(dim=0)
    act = act_absmax.float().to(weight_absmax.device).clamp(min=_MIN_ABSMAX)
    return (act.pow(alpha) / weight_absmax.clamp(min=_MIN_ABSMAX).pow(1.0 - alpha)).clamp(min=_MIN_ABSMAX)


@torch.no_grad()
def fold_smoothing(layer_norm: nn.LayerNorm, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide the LayerNorm's output channels by s and scale the Linears' input channels by s."""
    layer_norm.weight.copy_(layer_norm.weight.float() / s)
    layer_norm.bias.copy_(layer_norm.bias.float() / s)
    for linear in linears:
        linear.weight.copy_(linear.weight.float() * s[None, :])


def smooth_model(model: OPTForCausalLM, stats: ActivationStats, alpha: float) -> dict[str, torch.Tensor]:
    """Smooth every (LayerNorm -> Linear) pair in place; returns s per smoothed Linear's module path.

    self_attn_layer_norm feeds q/k/v (one fused Linear, so one shared s with the max over all three
    weights); final_layer_norm feeds fc1. out_proj and fc2 have no LayerNorm in front: unchanged.
    """
    arch = model.arch
    if not arch.do_layer_norm_before:
        raise QuantizationError(
            "smoothing needs pre-LayerNorm OPT (every size but 350m): in OPT-350m's post-LN blocks the "
            "LayerNorm output is also the residual, so s cannot be folded into it; quantize with --no-smooth"
        )
    if not arch.layer_norm_elementwise_affine:
        raise QuantizationError("smoothing folds s into LayerNorm weights, but this model's LayerNorms have none")
    factors: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(model.decoder.layers):
        prefix = f"decoder.layers.{index}"
        pairs = (
            (layer.self_attn_layer_norm, layer.self_attn.qkv_proj, f"{prefix}.self_attn.qkv_proj"),
            (layer.final_layer_norm, layer.fc1, f"{prefix}.fc1"),
        )
        for layer_norm, linear, name in pairs:
            s = smoothing_factors(stats[name], [linear.weight], alpha)
            fold_smoothing(layer_norm, [linear], s)
            factors[name] = s
    return factors
