"""The PyTorch references in engine/ops.py: exact integer products and the quantization conventions.

These references are the oracle for the CUDA kernels, so they are checked here against independent
float64 / int64 computations on fresh random inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import ops


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int8(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=_gen(seed))


@pytest.mark.parametrize("m,n,k", [(1, 16, 16), (7, 48, 32), (33, 80, 272), (128, 256, 1024)])
def test_int8_matmul_is_exact(m: int, n: int, k: int) -> None:
    a, w = _int8((m, k), m), _int8((n, k), n + 1)
    expected = a.long() @ w.long().t()
    assert torch.equal(ops.int8_matmul_exact(a, w).long(), expected)
    assert torch.equal(ops.int8_matmul_float64(a, w).long(), expected)


def test_int8_matmul_exact_at_the_extremes() -> None:
    k = 8192  # every product is +16384: the sum (134,217,728) needs all of int32's exactness
    a = torch.full((4, k), -128, dtype=torch.int8)
    w = torch.full((16, k), -128, dtype=torch.int8)
    assert ops.int8_matmul_exact(a, w).unique().tolist() == [k * 128 * 128]
    assert ops.int8_matmul_float64(a, w).unique().tolist() == [k * 128 * 128]


@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_w8a8_gemm_matches_float64_epilogue(per_token: bool, per_channel: bool, with_bias: bool, relu: bool) -> None:
    m, n, k = 19, 48, 64
    a, w = _int8((m, k), 3), _int8((n, k), 4)
    a_scale = torch.rand(m if per_token else 1, generator=_gen(5)) / 100 + 1e-3
    w_scale = torch.rand(n if per_channel else 1, generator=_gen(6)) / 100 + 1e-3
    bias = torch.randn(n, generator=_gen(7)) if with_bias else None
    out = ops.w8a8_gemm(a, w, a_scale, w_scale, bias, relu=relu, out_dtype=torch.float32)
    expected = (a.double() @ w.double().t()) * a_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)
    if bias is not None:
        expected = expected + bias.double()
    if relu:
        expected = expected.clamp(min=0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_w8a8_gemm_output_dtype(out_dtype: torch.dtype) -> None:
    a, w = _int8((4, 32), 1), _int8((16, 32), 2)
    out = ops.w8a8_gemm(a, w, torch.ones(4), torch.ones(16), out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (4, 16)


def test_w8a8_gemm_rejects_bad_operands() -> None:
    a, w = _int8((4, 32), 1), _int8((16, 32), 2)
    with pytest.raises(ValueError, match="int8"):
        ops.w8a8_gemm(a.float(), w, torch.ones(4), torch.ones(16))
    with pytest.raises(ValueError, match="K mismatch"):
        ops.w8a8_gemm(a, _int8((16, 48), 3), torch.ones(4), torch.ones(16))
    with pytest.raises(ValueError, match="a_scale"):
        ops.w8a8_gemm(a, w, torch.ones(3), torch.ones(16))
    with pytest.raises(ValueError, match="w_scale"):
        ops.w8a8_gemm(a, w, torch.ones(4), torch.ones(16, dtype=torch.float16))


def test_quantize_per_token_uses_each_rows_absmax() -> None:
    x = torch.randn(6, 40, generator=_gen(8)) * torch.arange(1, 7).float()[:, None]
    q = ops.quantize_per_token(x)
    assert q.data.dtype == torch.int8 and q.scale.shape == (6,)
    torch.testing.assert_close(q.scale, x.abs().amax(dim=1) / 127)
    assert q.data.abs().amax(dim=1).tolist() == [127] * 6
    assert ((q.data.float() * q.scale[:, None] - x).abs() <= q.scale[:, None] / 2 + 1e-6).all()


def test_quantize_per_tensor_uses_one_scale() -> None:
    x = torch.randn(6, 40, generator=_gen(9))
    q = ops.quantize_per_tensor(x)
    assert q.scale.shape == (1,)
    torch.testing.assert_close(q.scale, (x.abs().max() / 127).reshape(1))
    assert ((q.data.float() * q.scale - x).abs() <= q.scale / 2 + 1e-6).all()


def test_quantization_rounds_half_to_even_and_saturates() -> None:
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0]])
    q = ops.quantize_static(x, torch.tensor([1.0]))
    assert q.data.tolist() == [[0, 2, 2, 0, -2, 127, -128]]


def test_all_zero_token_quantizes_to_zero() -> None:
    q = ops.quantize_per_token(torch.zeros(2, 16))
    assert torch.equal(q.data, torch.zeros(2, 16, dtype=torch.int8))
    assert torch.isfinite(q.scale).all()


@pytest.mark.parametrize("mode", ["per_token", "per_tensor_dynamic", "per_tensor_static"])
def test_layernorm_quant_equals_layernorm_then_quantize(mode: str) -> None:
    x = torch.randn(9, 64, generator=_gen(10)) * 3 + 1
    weight, bias = torch.randn(64, generator=_gen(11)), torch.randn(64, generator=_gen(12))
    static = torch.tensor([0.05])
    q = ops.layernorm_quant(x, weight, bias, 1e-5, mode, static)
    normed = F.layer_norm(x.double(), (64,), weight.double(), bias.double(), 1e-5).float()
    expected = ops.quantize_activation(normed, mode, static)
    torch.testing.assert_close(q.scale, expected.scale)
    # float32 vs float64 normalization may flip a value that sits on a rounding boundary
    assert (q.data.int() - expected.data.int()).abs().max().item() <= 1


def test_quantize_weight_per_channel_and_per_tensor() -> None:
    w = torch.randn(8, 32, generator=_gen(13)) * torch.arange(1, 9).float()[:, None]
    q, scale = ops.quantize_weight(w, "per_channel")
    assert scale.shape == (8,) and q.abs().amax(dim=1).tolist() == [127] * 8
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    q, scale = ops.quantize_weight(w, "per_tensor")
    assert scale.shape == (1,) and q.abs().max().item() == 127
