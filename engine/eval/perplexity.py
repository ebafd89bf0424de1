"""Perplexity of a token stream, scored with a sliding window of the model's context."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engine.eval.timing import timed
from engine.models.opt import OPTForCausalLM


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    num_tokens: int  # tokens scored: all but the first
    num_windows: int  # forward passes
    seconds: float  # in the model's forward passes

    @property
    def latency_ms(self) -> float:
        """Mean time of one window's forward pass."""
        return 1000 * self.seconds / max(1, self.num_windows)


@torch.no_grad()
def score_stream(
    model: OPTForCausalLM, token_ids: torch.Tensor, window: int, stride: int | None = None, progress: bool = False
) -> PerplexityResult:
    """exp(mean NLL) over tokens 1..N-1 of `token_ids` [N] (token 0 is context only, e.g. BOS).

    Windows of `window` tokens advance by `stride` (default: window // 2); each token is scored once,
    in the first window that reaches it, with up to window - stride tokens of context before it.
    """
    if token_ids.dim() != 1 or len(token_ids) < 2:
        raise ValueError("perplexity needs a 1-D stream of at least 2 tokens")
    stride = stride or max(1, window // 2)
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window], got {stride} for window {window}")
    total_nll, scored_until = 0.0, 1  # tokens [1, scored_until) are scored
    num_windows, seconds = 0, 0.0
    starts = range(0, len(token_ids) - 1, stride)
    for start in tqdm(starts, desc="Perplexity", unit="window", disable=not progress):
        end = min(start + window, len(token_ids))
        if end <= scored_until:
            continue
        chunk = token_ids[start:end].to(model.device)
        logits, elapsed = timed(model.device, lambda chunk=chunk: model.score(chunk[None])[0])  # [L, vocab]
        num_windows, seconds = num_windows + 1, seconds + elapsed
        first_target = scored_until - start  # chunk index of the first token not yet scored
        nll = F.cross_entropy(logits[first_target - 1 : -1].float(), chunk[first_target:], reduction="sum")
        total_nll += nll.item()
        scored_until = end
        if end == len(token_ids):
            break
    return PerplexityResult(math.exp(total_nll / (len(token_ids) - 1)), len(token_ids) - 1, num_windows, seconds)


def perplexity(
    model: OPTForCausalLM, token_ids: torch.Tensor, window: int, stride: int | None = None, progress: bool = False
) -> float:
    """The perplexity alone; see `score_stream`."""
    return score_stream(model, token_ids, window, stride, progress).perplexity
