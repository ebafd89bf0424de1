"""Activation statistics gathered by calibration: the per-channel absmax of every Linear's input."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.ops import INV_INT8_MAX, MIN_SCALE


@dataclass(frozen=True)
class ActivationStats:
    """`absmax[name]` is float32 [in_features]: max |x_j| over all calibration tokens, per channel j.

    Names are module paths of the Linears, e.g. `decoder.layers.0.self_attn.qkv_proj`.
    """

    absmax: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.absmax[name]

    def static_scale(self, name: str) -> torch.Tensor:
        """The per-tensor static (O3) scale of a Linear's input: absmax over all channels / 127."""
        return (self.absmax[name].max() * INV_INT8_MAX).clamp(min=MIN_SCALE).reshape(1).float()

    def divided(self, factors: dict[str, torch.Tensor]) -> ActivationStats:
        """Statistics after smoothing: an input divided per channel by s has absmax / s exactly."""
        return ActivationStats(
            {name: (a / factors[name].to(a)) if name in factors else a for name, a in self.absmax.items()}
        )
