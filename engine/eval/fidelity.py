"""How closely a (quantized) model's next-token distributions track a reference model's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.models.opt import OPTForCausalLM


@dataclass(frozen=True)
class Fidelity:
    top1_agreement: float  # fraction of positions where both models' argmax tokens are equal
    mean_kl: float  # mean KL(reference || test) per position, in nats
    num_positions: int


@torch.no_grad()
def compare_models(reference: OPTForCausalLM, test: OPTForCausalLM, token_ids: torch.Tensor) -> Fidelity:
    """Compare next-token predictions on every position of `token_ids` [B, L]."""
    ref_logits = reference.score(token_ids.to(reference.device)).float().flatten(0, 1)
    test_logits = test.score(token_ids.to(test.device)).float().flatten(0, 1).to(ref_logits)
    agree = (ref_logits.argmax(-1) == test_logits.argmax(-1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(test_logits, -1), F.log_softmax(ref_logits, -1), log_target=True, reduction="batchmean")
    return Fidelity(top1_agreement=agree, mean_kl=kl.item(), num_positions=ref_logits.shape[0])
