"""W8A8Linear: a drop-in replacement for nn.Linear with int8 weights and int8 activations."""

from __future__ import annotations

import torch
from torch import nn

from engine import ops
from engine.config import ActivationQuant, WeightGranularity
from engine.ops import QuantizedActivation


class W8A8Linear(nn.Module):
    """y = dequant(quant(x) @ W_int8^T) + bias, with int32 accumulation and an fp epilogue.

    Buffers (all saved in W8A8 checkpoints):
      weight        int8 [N, K]
      weight_scale  float32 [N] (per output channel) or [1] (per tensor)
      bias          [N] in the model dtype, or absent
      input_scale   float32 [1], only for static activation quantization (O3)

    The input is a floating tensor [..., K], quantized here as `act_quant` says; or, where
    `act_quant` is None, a `QuantizedActivation` from the layer in front (a fused LayerNorm-quantize).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        act_quant: ActivationQuant | None,
        weight_granularity: WeightGranularity,
        fuse_relu: bool = False,
        bias_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.act_quant = act_quant
        self.weight_granularity = weight_granularity
        self.fuse_relu = fuse_relu
        num_scales = out_features if weight_granularity == "per_channel" else 1
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(num_scales, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)
        static = act_quant == "per_tensor_static"
        self.register_buffer("input_scale", torch.empty(1, dtype=torch.float32, device=device) if static else None)
        # The next layer's static input scale (O3 fc1 -> fc2), set by `chain_static_requantization`: the
        # GEMM epilogue then writes that layer's int8 input directly. Not a buffer: it *is* the next
        # layer's `input_scale`, so it is never saved twice or loaded out of step.
        self.requantize_scale: torch.Tensor | None = None

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        *,
        act_quant: ActivationQuant | None,
        weight_granularity: WeightGranularity,
        input_scale: torch.Tensor | None = None,
        fuse_relu: bool = False,
    ) -> W8A8Linear:
        """Quantize a floating Linear's weight; `input_scale` is the calibrated static scale (O3)."""
        qlinear = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            act_quant=act_quant,
            weight_granularity=weight_granularity,
            fuse_relu=fuse_relu,
            bias_dtype=linear.weight.dtype,
            device=linear.weight.device,
        )
        q, scale = ops.quantize_weight(linear.weight.detach(), weight_granularity)
        qlinear.weight.copy_(q)
        qlinear.weight_scale.copy_(scale)
        if linear.bias is not None:
            qlinear.bias.copy_(linear.bias.detach())
        if qlinear.input_scale is not None:
            if input_scale is None:
                raise ValueError("static activation quantization needs a calibrated input scale")
            qlinear.input_scale.copy_(input_scale.reshape(1))
        return qlinear

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor | QuantizedActivation:
        if isinstance(x, QuantizedActivation):
            qx, lead_shape = x, x.data.shape[:-1]
        elif self.act_quant is None:
            raise TypeError("this W8A8Linear is fed by a quantizing layer and takes a QuantizedActivation")
        else:
            lead_shape = x.shape[:-1]
            qx = ops.quantize_activation(x.reshape(-1, self.in_features), self.act_quant, self.input_scale)
        if self.requantize_scale is not None:
            data = ops.w8a8_gemm_int8_out(
                qx.data.reshape(-1, self.in_features), self.weight, qx.scale, self.weight_scale, self.bias,
                relu=self.fuse_relu, out_scale=self.requantize_scale,
            )  # fmt: skip
            return QuantizedActivation(data.reshape(*lead_shape, self.out_features), self.requantize_scale, qx.dtype)
        out = ops.w8a8_gemm(
            qx.data.reshape(-1, self.in_features),
            self.weight,
            qx.scale,
            self.weight_scale,
            self.bias,
            relu=self.fuse_relu,
            out_dtype=qx.dtype,
        )
        return out.reshape(*lead_shape, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"act_quant={self.act_quant}, weight_granularity={self.weight_granularity}, fuse_relu={self.fuse_relu}"
        )
