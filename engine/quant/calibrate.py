"""Calibration: run text through the float model and record every Linear input's per-channel absmax."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from engine.models.opt import OPTForCausalLM
from engine.quant.stats import ActivationStats


def quantizable_linears(model: OPTForCausalLM) -> dict[str, nn.Module]:
    """The Linears that W8A8 replaces, by module path: q/k/v (fused), out_proj, fc1, fc2 of every layer."""
    found: dict[str, nn.Module] = {}
    for index, layer in enumerate(model.decoder.layers):
        prefix = f"decoder.layers.{index}"
        found[f"{prefix}.self_attn.qkv_proj"] = layer.self_attn.qkv_proj
        found[f"{prefix}.self_attn.out_proj"] = layer.self_attn.out_proj
        found[f"{prefix}.fc1"] = layer.fc1
        found[f"{prefix}.fc2"] = layer.fc2
    return found


@torch.no_grad()
def calibrate(
    model: OPTForCausalLM, token_ids: torch.Tensor, batch_size: int = 1, progress: bool = True
) -> ActivationStats:
    """Per-channel absmax of every quantizable Linear's input over all tokens of `token_ids` [N, L]."""
    linears = quantizable_linears(model)
    for name, module in linears.items():
        if not isinstance(module, nn.Linear):
            raise TypeError(f"calibration needs the float model, but {name} is {type(module).__name__}")
    absmax: dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            channel_max = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            absmax[name] = channel_max if name not in absmax else torch.maximum(absmax[name], channel_max)

        return hook

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in linears.items()]
    try:
        for start in tqdm(range(0, len(token_ids), batch_size), desc="Calibrating", unit="batch", disable=not progress):
            model.score(token_ids[start : start + batch_size].to(model.device))
    finally:
        for handle in handles:
            handle.remove()
    return ActivationStats({name: a.cpu() for name, a in absmax.items()})
