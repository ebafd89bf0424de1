"""Smoothing moves outliers from activations into weights without changing the model's function."""

from __future__ import annotations

import pytest
import torch

from engine.errors import QuantizationError
from engine.quant.calibrate import calibrate
from engine.quant.data import token_windows
from engine.quant.smooth import smooth_model, smoothing_factors
from engine.tiny_model import shipped_corpus, split_corpus
from engine.tokenizer import load_tokenizer
from tests.conftest import load_cpu


def _calibration_ids(model_dir, num_samples: int = 8, seq_len: int = 64) -> torch.Tensor:
    train, _ = split_corpus(shipped_corpus())
    return token_windows(load_tokenizer(model_dir), [train[:50_000]], num_samples, seq_len).token_ids


def _eval_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(4, vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))


def test_smoothing_factor_formula() -> None:
    act = torch.tensor([4.0, 1.0, 100.0])
    weights = [torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-4.0, 1.0, 0.25]])]
    s = smoothing_factors(act, weights, alpha=0.5)
    expected = torch.tensor([4.0**0.5 / 4.0**0.5, 1.0 / 2.0**0.5, 100.0**0.5 / 0.5**0.5])
    torch.testing.assert_close(s, expected)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_alone_leaves_logits_unchanged(tiny_outlier_model_dir, alpha: float) -> None:
    loaded = load_cpu(tiny_outlier_model_dir)
    ids = _eval_ids(loaded.arch.vocab_size)
    before = loaded.model.score(ids)
    smooth_model(loaded.model, calibrate(loaded.model, _calibration_ids(tiny_outlier_model_dir), progress=False), alpha)
    after = loaded.model.score(ids)
    assert (after - before).abs().max().item() < 1e-4


def test_smoothing_shrinks_activation_outliers(tiny_outlier_model_dir) -> None:
    loaded = load_cpu(tiny_outlier_model_dir)
    calib = _calibration_ids(tiny_outlier_model_dir)
    name = "decoder.layers.1.self_attn.qkv_proj"
    before = calibrate(loaded.model, calib, progress=False)[name]
    smooth_model(loaded.model, calibrate(loaded.model, calib, progress=False), 0.5)
    after = calibrate(loaded.model, calib, progress=False)[name]
    ratio = lambda a: (a.max() / a.median()).item()  # noqa: E731
    assert ratio(before) > 15  # planted outliers are there ...
    assert ratio(after) < ratio(before) / 4  # ... and smoothing flattens them


def test_planted_outliers_preserve_the_function(tiny_model_dir, tiny_outlier_model_dir) -> None:
    plain, planted = load_cpu(tiny_model_dir), load_cpu(tiny_outlier_model_dir)
    ids = _eval_ids(plain.arch.vocab_size)
    assert (plain.model.score(ids) - planted.model.score(ids)).abs().max().item() < 1e-4
    ln_plain = plain.model.decoder.layers[0].self_attn_layer_norm.weight
    ln_planted = planted.model.decoder.layers[0].self_attn_layer_norm.weight
    assert (ln_planted.abs() / ln_plain.abs()).max().item() >= 20


def test_post_ln_model_cannot_be_smoothed(tiny_post_ln_model_dir) -> None:
    loaded = load_cpu(tiny_post_ln_model_dir)
    stats = calibrate(loaded.model, _calibration_ids(tiny_post_ln_model_dir, 2, 16), progress=False)
    with pytest.raises(QuantizationError, match="post-LN"):
        smooth_model(loaded.model, stats, 0.5)
