"""LayerNorms: the float one of the model, and the one that feeds W8A8Linears (normalize + quantize).

Both offer `add_and_norm(residual, update)`, the residual add followed by the normalization, which the
quantizing LayerNorm runs as one kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from engine import ops
from engine.config import ActivationQuant
from engine.ops import QuantizedActivation


class LayerNorm(nn.LayerNorm):
    def add_and_norm(self, residual: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + update, LayerNorm(residual + update))."""
        summed = residual + update
        return summed, self(summed)


class QuantizingLayerNorm(nn.Module):
    """LayerNorm whose output is int8 (with its scale), for a pre-LN block's q/k/v or fc1.

    Only valid where the LayerNorm output feeds nothing but W8A8Linears (pre-LN OPT); the smoothing
    factors are already folded into `weight` and `bias`. `output_scale` exists for static (O3)
    quantization only.
    """

    def __init__(
        self,
        normalized_shape: int,
        *,
        eps: float,
        act_quant: ActivationQuant,
        elementwise_affine: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.act_quant = act_quant
        affine = (
            (lambda: nn.Parameter(torch.empty(normalized_shape, dtype=dtype, device=device)))
            if elementwise_affine
            else (lambda: None)
        )
        self.weight = affine()
        self.bias = affine()
        static = act_quant == "per_tensor_static"
        self.register_buffer("output_scale", torch.empty(1, dtype=torch.float32, device=device) if static else None)

    @classmethod
    def from_float(
        cls, layer_norm: nn.LayerNorm, *, act_quant: ActivationQuant, output_scale: torch.Tensor | None = None
    ) -> QuantizingLayerNorm:
        weight = layer_norm.weight
        qln = cls(
            layer_norm.normalized_shape[0],
            eps=layer_norm.eps,
            act_quant=act_quant,
            elementwise_affine=weight is not None,
            dtype=weight.dtype if weight is not None else torch.float32,
            device=weight.device if weight is not None else None,
        )
        with torch.no_grad():
            if weight is not None:
                qln.weight.copy_(layer_norm.weight)
                qln.bias.copy_(layer_norm.bias)
            if qln.output_scale is not None:
                if output_scale is None:
                    raise ValueError("static activation quantization needs a calibrated output scale")
                qln.output_scale.copy_(output_scale.reshape(1))
        return qln

    def forward(self, x: torch.Tensor) -> QuantizedActivation:
        x2 = x.reshape(-1, self.normalized_shape)
        return ops.layernorm_quant(x2, self.weight, self.bias, self.eps, self.act_quant, self.output_scale)

    def add_and_norm(self, residual: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, QuantizedActivation]:
        """(residual + update, quantized LayerNorm of it), in one pass over the activations."""
        quantized, summed = ops.add_layernorm_quant(
            update.reshape(-1, self.normalized_shape), residual.reshape(-1, self.normalized_shape),
            self.weight, self.bias, self.eps, self.act_quant, self.output_scale,
        )  # fmt: skip
        return summed.view_as(residual), quantized

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, act_quant={self.act_quant}"
