"""Sampling parameters and the sampler: validation, exact distributions, seeds, penalties, logprobs."""

from __future__ import annotations

import pytest
import torch

from engine.errors import ConfigError
from engine.sampling import SamplingParams, SamplingRow, sample

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])


def rows(params: SamplingParams, count: int, outputs: list[int] | None = None, seed: int | None = None):
    return [
        SamplingRow(params, [0], list(outputs or []),
                    torch.Generator().manual_seed(seed) if seed is not None else None, eos_token_id=5)
        for _ in range(count)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": ["ok", ""]}, "stop strings"),
        ({"logprobs": 21}, "logprobs"),
    ],
)
def test_invalid_parameters_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)


def test_a_single_stop_string_and_lists_become_tuples() -> None:
    params = SamplingParams(stop="\n", stop_token_ids=[7])
    assert params.stop == ("\n",) and params.stop_token_ids == (7,)


def test_temperature_zero_is_greedy() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    out = sample(logits, rows(SamplingParams(temperature=0.0), 5))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_unfiltered_rows_report_the_full_softmax_and_mixed_batches_keep_greedy_rows_greedy() -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 4
    greedy = sample(logits, rows(SamplingParams(temperature=0.0, logprobs=3), 4))
    full = logits.log_softmax(-1)  # no top-k / top-p: nothing is cut, however small its probability
    assert greedy.logprobs == full.gather(-1, full.argmax(-1, keepdim=True)).squeeze(-1).tolist()
    assert [[t for t, _ in top] for top in greedy.top_logprobs] == full.topk(3).indices.tolist()
    warm = rows(SamplingParams(temperature=0.7, seed=3), 2, seed=3)
    mixed = sample(logits, rows(SamplingParams(temperature=0.0), 2) + warm)
    assert mixed.token_ids[:2] == logits[:2].argmax(-1).tolist()
    assert torch.allclose(torch.tensor(mixed.logprobs[2:]), (logits[2:] / 0.7).log_softmax(-1).gather(
        -1, torch.tensor(mixed.token_ids[2:])[:, None]).squeeze(-1))  # fmt: skip


def exact_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The straightforward definition: scale, keep the k best, then the smallest set reaching top_p."""
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    kept = order[:top_k] if top_k else order
    renormalized = probs[kept] / probs[kept].sum()
    total, final = 0.0, []
    for token, p in zip(kept, renormalized.tolist(), strict=True):
        final.append(token)
        total += p
        if total >= top_p:
            break
    result = torch.zeros_like(probs)
    result[final] = probs[final] / probs[final].sum()
    return result


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8), (0.9, 5, 0.9)])
def test_draws_follow_the_exact_distribution(temperature: float, top_k: int, top_p: float) -> None:
    torch.manual_seed(1234)
    draws = 40_000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    out = sample(LOGITS.repeat(draws, 1), rows(params, draws))
    observed = torch.bincount(torch.tensor(out.token_ids), minlength=len(LOGITS)).float()
    expected = exact_distribution(LOGITS, temperature, top_k, top_p) * draws
    assert (observed[expected == 0] == 0).all(), "drew a token that top-k/top-p excludes"
    support = expected > 0
    chi_square = (((observed - expected) ** 2)[support] / expected[support]).sum().item()
    assert chi_square < 22.5  # p = 0.001 for up to 5 degrees of freedom is 20.5; never a fluke by design


def test_a_seeded_request_draws_the_same_tokens_whatever_the_batch() -> None:
    params = SamplingParams(temperature=1.0, seed=7)
    vocab_logits = torch.randn(100, generator=torch.Generator().manual_seed(3))

    def draws(batch_size: int) -> list[int]:
        seeded = rows(params, 1, seed=7)[0]
        others = rows(SamplingParams(temperature=1.0), batch_size - 1)
        tokens = []
        for _ in range(10):
            out = sample(
                vocab_logits.repeat(batch_size, 1), [*others[: batch_size // 2], seeded, *others[batch_size // 2 :]]
            )
            tokens.append(out.token_ids[batch_size // 2])
        return tokens

    assert draws(1) == draws(5) == draws(12)
    assert len(set(draws(1))) > 1  # it really samples


def test_presence_frequency_and_repetition_penalties() -> None:
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, logprobs=4)
    out = sample(logits.clone(), rows(params, 1, outputs=[1, 1, 2]))
    # token 1: 2.0 - 0.5 - 2 * 0.25 = 1.0; token 2: -1.0 - 0.5 - 0.25 = -1.75
    adjusted = torch.tensor([1.0, 1.0, -1.75, 0.5])
    expected = dict(zip(range(4), adjusted.log_softmax(-1).tolist(), strict=True))
    for token, value in out.top_logprobs[0]:
        assert value == pytest.approx(expected[token], abs=1e-5)
    penalized = SamplingParams(temperature=0.0, repetition_penalty=8.0)
    repetition = sample(logits.clone(), rows(penalized, 1, outputs=[1]))  # the prompt is [0]
    assert repetition.token_ids == [3]  # 1.0 / 8 and 2.0 / 8 fall below 0.5; -1.0 was never seen


def test_min_tokens_holds_back_eos_and_stop_tokens() -> None:
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 0.0, 10.0]])  # EOS (5) then token 2 are the favourites
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(2,))
    assert sample(logits, rows(params, 1, outputs=[3])).token_ids == [0]
    assert sample(logits, rows(params, 1, outputs=[3, 4])).token_ids == [5]
    ignore = SamplingParams(temperature=0.0, ignore_eos=True, min_tokens=2)
    assert sample(logits, rows(ignore, 1, outputs=[])).token_ids == [5]  # ignore_eos: EOS is an ordinary token


def test_logprobs_are_sorted_and_normalized() -> None:
    out = sample(LOGITS[None].clone(), rows(SamplingParams(logprobs=3), 1))
    values = [v for _, v in out.top_logprobs[0]]
    assert values == sorted(values, reverse=True) and len(values) == 3
    assert [t for t, _ in out.top_logprobs[0]] == [0, 1, 2]
    assert values[0] == pytest.approx(LOGITS.log_softmax(-1)[0].item(), abs=1e-6)
    assert out.logprobs[0] <= 0.0
