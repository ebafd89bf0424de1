"""The int8-output W8A8 GEMM's reference (engine/ops.py), the oracle of its CUDA kernels.

Checked against an independent float64 computation, and on constructed inputs for the rounding rules:
one rounding in the fma, round half to even, ReLU before requantizing, saturation.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from engine import ops

FLOAT32_EPS = 2.0**-24  # unit roundoff of float32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(shape: tuple[int, ...], seed: int, low: int = -128, high: int = 128) -> torch.Tensor:
    return torch.randint(low, high, shape, dtype=torch.int8, generator=_gen(seed))


def _correctly_rounded_fma(a: float, b: float, c: float) -> float:
    """float32(a * b + c) with the sum taken exactly (rationals), rounded to nearest, ties to even."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    nearest = torch.tensor(float(exact), dtype=torch.float32)  # within one float32 step of the answer
    neighbours = [torch.nextafter(nearest, torch.tensor(direction)) for direction in (-float("inf"), float("inf"))]
    candidates = [nearest, *neighbours]
    return min(
        (float(x) for x in candidates),
        key=lambda x: (abs(Fraction(x) - exact), torch.tensor(x, dtype=torch.float32).view(torch.int32).item() & 1),
    )


def test_fma_float32_rounds_once_where_float64_would_round_twice() -> None:
    # (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 is a float32 tie; a tiny positive addend breaks it upwards. A
    # float64 sum rounds the addend away first and then the tie goes to even, downwards.
    x = torch.tensor([1 + 2.0**-12])
    c = torch.tensor([2.0**-80])
    assert ops.fma_float32(x, x, c).item() == 1 + 2.0**-11 + 2.0**-23
    assert (x.double() * x.double() + c.double()).float().item() == 1 + 2.0**-11


def test_fma_float32_is_correctly_rounded_on_random_operands() -> None:
    g = _gen(0)
    magnitudes = 10.0 ** torch.randint(-6, 6, (3, 500), generator=g)
    a, b, c = (torch.randn(3, 500, generator=g) * magnitudes).float()
    out = ops.fma_float32(a, b, c)
    expected = [_correctly_rounded_fma(x, y, z) for x, y, z in zip(a.tolist(), b.tolist(), c.tolist(), strict=True)]
    assert out.tolist() == expected


def _case(m: int, n: int, k: int, seed: int, per_token: bool, per_channel: bool, bias_dtype: torch.dtype | None):
    a, w = _int8((m, k), seed), _int8((n, k), seed + 1)
    a_scale = torch.rand(m if per_token else 1, generator=_gen(seed + 2)) * 1e-3 + 1e-4
    w_scale = torch.rand(n if per_channel else 1, generator=_gen(seed + 3)) * 1e-3 + 1e-4
    bias = (torch.randn(n, generator=_gen(seed + 4)) * 0.5).to(bias_dtype) if bias_dtype is not None else None
    return a, w, a_scale, w_scale, bias


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bias_dtype", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("relu", [True, False])
def test_int8_out_reference_matches_float64_except_at_ties(per_token, per_channel, bias_dtype, relu) -> None:
    m, n, k = 37, 96, 512
    a, w, a_scale, w_scale, bias = _case(m, n, k, 11, per_token, per_channel, bias_dtype)
    # Independently, in float64: y = a_scale * w_scale * acc + bias.
    acc = a.double() @ w.double().t()
    scaled = acc * a_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)
    y = scaled + (bias.double() if bias is not None else 0.0)
    if relu:
        y = y.clamp(min=0)
    out_scale = (y.abs().amax() / 127 * 0.6).float().reshape(1)  # saturates the largest values
    v = y / out_scale.double()
    expected = torch.round(v).clamp(-128, 127)  # round half to even

    q = ops.w8a8_gemm_int8_out_reference(a, w, a_scale, w_scale, bias, relu, out_scale)
    assert q.dtype == torch.int8 and q.shape == (m, n)
    assert (q == 127).any() and (q.abs() < 64).any(), "the case must exercise saturation and in-range codes"
    # float32 rounds four times (acc, w_scale * acc, the fma, the division), each within FLOAT32_EPS
    # relative: a code may differ only where v lies that close to a rounding tie, and then by one.
    tolerance = 4 * FLOAT32_EPS * (scaled.abs() + y.abs()) / out_scale.double()
    near_tie = ((v - v.floor()) - 0.5).abs() <= tolerance
    difference = (q.double() - expected).abs()
    assert difference.max().item() <= 1
    assert not ((difference > 0) & ~near_tie).any(), "a code differs away from any rounding tie"
    assert (difference > 0).double().mean().item() < 1e-3


def test_int8_out_rounds_exact_ties_half_to_even() -> None:
    # Unit scales and out_scale 2: y = acc exactly, and every odd acc is an exact tie acc / 2.
    a, w = _int8((24, 64), 21, -2, 3), _int8((32, 64), 22, -2, 3)
    acc = a.long() @ w.long().t()
    q = ops.w8a8_gemm_int8_out_reference(a, w, torch.ones(1), torch.ones(1), None, False, torch.tensor([2.0]))
    expected = torch.tensor([round(x / 2) for x in acc.flatten().tolist()]).reshape(acc.shape)  # banker's rounding
    assert (acc % 2 == 1).sum() > 100, "the case must contain ties"
    assert torch.equal(q.long(), expected.clamp(-128, 127))


def test_int8_out_applies_relu_before_requantizing() -> None:
    a, w, a_scale, w_scale, bias = _case(16, 48, 64, 31, True, True, torch.float16)
    out_scale = torch.tensor([0.01])
    plain = ops.w8a8_gemm_int8_out_reference(a, w, a_scale, w_scale, bias, False, out_scale)
    rectified = ops.w8a8_gemm_int8_out_reference(a, w, a_scale, w_scale, bias, True, out_scale)
    assert (plain < 0).any()
    assert torch.equal(rectified, plain.clamp(min=0))


def test_int8_out_saturates_to_the_int8_range() -> None:
    a, w = _int8((8, 32), 41), _int8((16, 32), 42)
    q = ops.w8a8_gemm_int8_out_reference(a, w, torch.ones(1), torch.ones(1), None, False, torch.tensor([1e-6]))
    acc = a.long() @ w.long().t()
    assert torch.equal(q.long(), torch.where(acc > 0, 127, torch.where(acc < 0, -128, 0)))


def test_int8_out_wrapper_runs_the_reference_on_cpu() -> None:
    a, w, a_scale, w_scale, bias = _case(5, 32, 48, 51, False, True, torch.bfloat16)
    out_scale = torch.tensor([0.02])
    q = ops.w8a8_gemm_int8_out(a, w, a_scale, w_scale, bias, True, out_scale)
    assert torch.equal(q, ops.w8a8_gemm_int8_out_reference(a, w, a_scale, w_scale, bias, True, out_scale))


def test_int8_out_rejects_bad_operands() -> None:
    a, w = _int8((4, 32), 1), _int8((16, 32), 2)
    ones_m, ones_n, scale = torch.ones(4), torch.ones(16), torch.tensor([0.1])
    with pytest.raises(ValueError, match="bias must be float16 or bfloat16"):
        ops.w8a8_gemm_int8_out(a, w, ones_m, ones_n, torch.zeros(16, dtype=torch.float64), False, scale)
    with pytest.raises(ValueError, match=r"bias must be float16 or bfloat16 \(float32 on the CPU\) with 16 elements"):
        ops.w8a8_gemm_int8_out(a, w, ones_m, ones_n, torch.zeros(8, dtype=torch.float16), False, scale)
    with pytest.raises(ValueError, match="out_scale must be float32"):
        ops.w8a8_gemm_int8_out(a, w, ones_m, ones_n, None, False, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="out_scale must be float32"):
        ops.w8a8_gemm_int8_out(a, w, ones_m, ones_n, None, False, torch.tensor([0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="multiples of 16"):
        ops.w8a8_gemm_int8_out(_int8((4, 40), 3), _int8((16, 40), 4), ones_m, ones_n, None, False, scale)
    with pytest.raises(ValueError, match="a_scale"):
        ops.w8a8_gemm_int8_out(a, w, torch.ones(3), ones_n, None, False, scale)
