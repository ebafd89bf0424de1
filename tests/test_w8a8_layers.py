"""W8A8Linear and QuantizingLayerNorm behave as drop-ins for nn.Linear and nn.LayerNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import ops
from engine.layers.layernorm import QuantizingLayerNorm
from engine.layers.linear import W8A8Linear

MODES = ["per_token", "per_tensor_dynamic", "per_tensor_static"]


def _linear(seed: int, k: int = 96, n: int = 64) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_w8a8_linear_approximates_float_linear(mode: str, granularity: str) -> None:
    linear = _linear(0)
    x = torch.randn(2, 11, 96)
    static = (x.abs().max() / 127).reshape(1)
    qlinear = W8A8Linear.from_float(linear, act_quant=mode, weight_granularity=granularity, input_scale=static)
    out, expected = qlinear(x), linear(x)
    assert out.shape == expected.shape == (2, 11, 64)
    relative = (out - expected).norm() / expected.norm()
    assert 0 < relative.item() < 0.02  # int8 noise, but far below the signal


def test_w8a8_linear_equals_dequantized_reference_exactly() -> None:
    linear = _linear(1)
    qlinear = W8A8Linear.from_float(linear, act_quant="per_token", weight_granularity="per_channel")
    x = torch.randn(5, 96)
    qx = ops.quantize_per_token(x)
    manual = (qx.data.double() * qx.scale.double()[:, None]) @ (
        qlinear.weight.double() * qlinear.weight_scale.double()[:, None]
    ).t() + linear.bias.double()
    torch.testing.assert_close(qlinear(x).double(), manual, rtol=1e-5, atol=1e-5)


def test_fused_relu_equals_relu_after_linear() -> None:
    linear = _linear(2)
    plain = W8A8Linear.from_float(linear, act_quant="per_token", weight_granularity="per_channel")
    fused = W8A8Linear.from_float(linear, act_quant="per_token", weight_granularity="per_channel", fuse_relu=True)
    x = torch.randn(7, 96)
    out = fused(x)
    assert torch.equal(out, torch.relu(plain(x)))
    assert (out == 0).any() and (out > 0).any()


def test_static_quantization_needs_a_scale() -> None:
    with pytest.raises(ValueError, match="scale"):
        W8A8Linear.from_float(_linear(3), act_quant="per_tensor_static", weight_granularity="per_tensor")


@pytest.mark.parametrize("mode", MODES)
def test_quantizing_layernorm_feeds_w8a8_linear(mode: str) -> None:
    torch.manual_seed(4)
    layer_norm = nn.LayerNorm(96)
    nn.init.normal_(layer_norm.weight)
    nn.init.normal_(layer_norm.bias)
    linear = _linear(5)
    x = torch.randn(13, 96) * 4
    normed = layer_norm(x).detach()
    static = (normed.abs().max() / 127).reshape(1)
    qln = QuantizingLayerNorm.from_float(layer_norm, act_quant=mode, output_scale=static)
    fed = W8A8Linear.from_float(linear, act_quant=None, weight_granularity="per_channel")
    self_quantizing = W8A8Linear.from_float(
        linear, act_quant=mode, weight_granularity="per_channel", input_scale=static
    )
    fused_path = fed(qln(x))
    unfused_path = self_quantizing(normed)
    torch.testing.assert_close(fused_path, unfused_path, rtol=1e-2, atol=1e-2)
    relative = (fused_path - linear(normed)).norm() / linear(normed).norm()
    assert relative.item() < 0.02


def test_linear_fed_by_quantizing_layer_rejects_float_input() -> None:
    fed = W8A8Linear.from_float(_linear(6), act_quant=None, weight_granularity="per_channel")
    with pytest.raises(TypeError, match="QuantizedActivation"):
        fed(torch.randn(2, 96))


@pytest.mark.parametrize("mode", MODES)
def test_add_and_norm_quantizing_matches_float_add_then_norm(mode: str) -> None:
    from engine.layers.layernorm import LayerNorm

    torch.manual_seed(7)
    layer_norm = LayerNorm(96)
    nn.init.normal_(layer_norm.weight)
    residual, update = torch.randn(6, 96) * 3, torch.randn(6, 96)
    summed, normed = layer_norm.add_and_norm(residual, update)
    assert torch.equal(summed, residual + update)
    static = (normed.abs().max() / 127).reshape(1).detach()
    qln = QuantizingLayerNorm.from_float(layer_norm, act_quant=mode, output_scale=static)
    q_summed, quantized = qln.add_and_norm(residual, update)
    assert torch.equal(q_summed, summed)
    dequantized = quantized.data.float() * quantized.scale.reshape(-1, 1)
    assert (dequantized - normed).abs().max().item() <= quantized.scale.max().item() / 2 + 1e-5


def test_o3_fc1_requantizes_for_fc2_in_its_epilogue(tiny_outlier_model_dir) -> None:
    """O3: fc1's GEMM writes fc2's int8 input (by fc2's static scale) instead of fp output quantized again;
    the model computes what the unchained one does, up to rounding ties."""
    from engine.config import QuantConfig
    from engine.quant.calibrate import calibrate
    from engine.quant.quantize import chain_static_requantization, smoothquant
    from tests.conftest import load_cpu

    model = load_cpu(tiny_outlier_model_dir).model
    tokens = torch.randint(4, model.arch.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    smoothquant(model, QuantConfig(level="O3", alpha=0.5), calibrate(model, tokens, progress=False))
    layers = model.decoder.layers
    assert all(layer.fc1.requantize_scale is layer.fc2.input_scale for layer in layers)
    assert not any("requantize" in name for name in model.state_dict())  # never saved twice

    normed = layers[0].final_layer_norm(torch.randn(5, model.arch.hidden_size))
    handed_over = layers[0].fc1(normed)
    assert isinstance(handed_over, ops.QuantizedActivation) and handed_over.data.dtype == torch.int8
    assert handed_over.scale is layers[0].fc2.input_scale

    chained = model.score(tokens)
    for layer in layers:
        layer.fc1.requantize_scale = None
    unchained = model.score(tokens)
    assert (chained.argmax(-1) == unchained.argmax(-1)).float().mean() >= 0.98
    torch.testing.assert_close(chained, unchained, atol=0.05, rtol=0.0)
    assert chain_static_requantization(model) == len(layers)
