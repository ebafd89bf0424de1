"""Sampling parameters (validated) and the batched sampler.

The sampler works on a batch of logits [B, V], one row per sequence that samples this step: penalties,
temperature, top-k, top-p, then a draw. A seeded request draws with its own torch.Generator, so its
tokens do not depend on what else is in the batch; unseeded rows share one batched draw. Temperature 0
is greedy (argmax).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.errors import ConfigError

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # how many top log-probabilities to return per token

    def __post_init__(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ConfigError(message)

        # Lists from JSON become tuples so the object stays hashable and immutable.
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        require(self.n >= 1, f"n must be >= 1, got {self.n}")
        require(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        require(
            0 <= self.min_tokens <= self.max_tokens, f"min_tokens must be in [0, max_tokens], got {self.min_tokens}"
        )
        require(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        require(
            -2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"
        )
        require(
            -2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
        )
        require(self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        require(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        require(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids")
        if self.logprobs is not None:
            require(0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SamplingRow:
    """One sequence's row of the batch: its parameters, generated tokens and (if seeded) generator."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = field(default=None, repr=False)
    eos_token_id: int | None = None


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each sampled token under the final distribution
    top_logprobs: list[list[tuple[int, float]]]  # per row, the requested number of (token, logprob)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """OpenAI presence/frequency penalties on generated tokens; the CTRL repetition penalty on prompt
    and generated tokens (positive logits divided by it, negative multiplied)."""
    for index, row in enumerate(rows):
        p = row.params
        if p.presence_penalty == p.frequency_penalty == 0.0 and p.repetition_penalty == 1.0:
            continue
        if row.output_token_ids and (p.presence_penalty or p.frequency_penalty):
            ids, counts = torch.tensor(row.output_token_ids, device=logits.device).unique(return_counts=True)
            logits[index, ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(row.prompt_token_ids + row.output_token_ids, device=logits.device).unique()
            values = logits[index, seen]
            logits[index, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    return logits


def suppress_stops_before_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """While a row has fewer than min_tokens outputs, EOS (unless ignored) and stop tokens cannot be drawn."""
    for index, row in enumerate(rows):
        p = row.params
        if len(row.output_token_ids) >= p.min_tokens:
            continue
        banned = list(p.stop_token_ids)
        if row.eos_token_id is not None and not p.ignore_eos:
            banned.append(row.eos_token_id)
        if banned:
            logits[index, banned] = float("-inf")
    return logits


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p leave out; top_k 0 keeps everything."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Keep the smallest prefix whose probability reaches top_p (the token crossing it included).
    before = probs.cumsum(dim=-1) - probs
    drop |= before >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


@torch.no_grad()
def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    """Draw one token per row of logits [B, V] (float32 internally)."""
    logits = suppress_stops_before_min_tokens(apply_penalties(logits.float().clone(), rows), rows)
    device = logits.device
    # One temperature for the whole batch (all greedy, 0 -> 1, is the common case) needs no host-to-device copy.
    temperatures = [r.params.temperature or 1.0 for r in rows]
    if len(set(temperatures)) == 1:
        if temperatures[0] != 1.0:
            logits = logits / temperatures[0]
    else:
        logits = logits / torch.tensor(temperatures, device=device)[:, None]
    # The full-vocabulary sort of top-k / top-p only where some row asks for it (a server's default).
    if any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in rows):
        top_k = torch.tensor([r.params.top_k for r in rows], device=device)
        top_p = torch.tensor([r.params.top_p for r in rows], device=device)
        logits = _filter_top_k_top_p(logits, top_k, top_p)
    logprobs = logits.log_softmax(dim=-1)

    if all(r.params.greedy for r in rows):
        chosen = logprobs.argmax(dim=-1)
    else:
        # Gumbel-max in its exponential form: argmax(p / E) with E ~ Exp(1) draws from p.
        noise = torch.empty_like(logprobs).exponential_()
        for index, row in enumerate(rows):
            if row.generator is not None:
                noise[index] = torch.empty(noise.shape[-1], device=device).exponential_(generator=row.generator)
        sampled = (logprobs.exp() / noise).argmax(dim=-1)
        greedy = torch.tensor([r.params.greedy for r in rows], dtype=torch.bool, device=device)
        chosen = torch.where(greedy, logprobs.argmax(dim=-1), sampled)

    chosen_logprobs = logprobs.gather(-1, chosen[:, None]).squeeze(-1)
    top: list[list[tuple[int, float]]] = []
    most = max((r.params.logprobs or 0) for r in rows)
    if most:
        values, ids = logprobs.topk(most, dim=-1)
        for index, row in enumerate(rows):
            count = row.params.logprobs or 0
            top.append(list(zip(ids[index, :count].tolist(), values[index, :count].tolist(), strict=True)))
    else:
        top = [[] for _ in rows]
    return SamplerOutput(chosen.tolist(), chosen_logprobs.tolist(), top)
