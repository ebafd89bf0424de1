"""How closely a (quantized) model's next-token distributions track a reference model's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.layers.attention import AttentionMetadata, PagedKVCache
from engine.models.opt import OPTForCausalLM


@dataclass(frozen=True)
class Fidelity:
    top1_agreement: float  # fraction of positions where both models' argmax tokens are equal
    mean_kl: float  # mean KL(reference || test) per position, in nats
    num_positions: int


def compare_log_probs(reference: torch.Tensor, test: torch.Tensor) -> Fidelity:
    """Next-token log-probabilities [positions, vocab] of two models on the same positions."""
    agree = (reference.argmax(-1) == test.argmax(-1)).float().mean().item()
    kl = F.kl_div(test, reference, log_target=True, reduction="batchmean")
    return Fidelity(top1_agreement=agree, mean_kl=kl.item(), num_positions=reference.shape[0])


@torch.no_grad()
def compare_models(reference: OPTForCausalLM, test: OPTForCausalLM, token_ids: torch.Tensor) -> Fidelity:
    """Compare next-token predictions on every position of `token_ids` [B, L]."""
    ref_logits = reference.score(token_ids.to(reference.device)).float().flatten(0, 1)
    test_logits = test.score(token_ids.to(test.device)).float().flatten(0, 1).to(ref_logits)
    return compare_log_probs(F.log_softmax(ref_logits, -1), F.log_softmax(test_logits, -1))


@torch.no_grad()
def score_through_kv_cache(model: OPTForCausalLM, token_ids: torch.Tensor, chunk: int, quantized_kv: bool,
                           block_size: int = 16) -> torch.Tensor:  # fmt: skip
    """Logits [L, vocab] of one sequence [L] run as the engine runs a long prompt: chunks of `chunk` tokens,
    each attending to the earlier ones through a paged KV cache (int8 when `quantized_kv`). Against the
    no-cache `score`, this measures what the cache's storage does to the model's predictions."""
    length = token_ids.shape[0]
    device = model.device
    num_blocks = -(-length // block_size)
    attentions = [layer.self_attn.attn for layer in model.decoder.layers]
    dtype = model.decoder.embed_tokens.weight.dtype
    for attn in attentions:
        attn.kv_cache = PagedKVCache.allocate(num_blocks, block_size, attn.num_heads, attn.head_dim, dtype, device,
                                              quantized=quantized_kv)  # fmt: skip
    table = torch.arange(num_blocks, dtype=torch.int32, device=device)[None]
    logits = []
    try:
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            positions = torch.arange(start, end, device=device)
            metadata = AttentionMetadata(seq_lens=(end - start,), context_lens=(start,), slot_mapping=positions,
                                         block_tables=table)  # fmt: skip
            hidden = model(token_ids[start:end].to(device), positions, metadata)
            logits.append(model.compute_logits(hidden))
    finally:
        for attn in attentions:
            attn.kv_cache = None
    return torch.cat(logits)
