"""The SmoothQuant claim on a trained tiny model with OPT-like outliers: smoothed W8A8 tracks the
float model closely, naive W8A8 (same level, no smoothing) does not."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.config import QuantConfig
from engine.eval.fidelity import compare_models
from engine.eval.perplexity import perplexity
from engine.quant.calibrate import calibrate
from engine.quant.data import token_windows
from engine.quant.quantize import smoothquant
from engine.tiny_model import shipped_corpus, split_corpus
from engine.tokenizer import load_tokenizer
from tests.conftest import load_cpu

SEQ_LEN = 128


@pytest.fixture(scope="module")
def setting(trained_outlier_model_dir):
    loaded = load_cpu(trained_outlier_model_dir)
    tokenizer = load_tokenizer(trained_outlier_model_dir)
    train, heldout = split_corpus(shipped_corpus())
    calibration = token_windows(tokenizer, [train], 32, SEQ_LEN).token_ids
    eval_windows = token_windows(tokenizer, [heldout], 24, SEQ_LEN).token_ids
    heldout_stream = torch.tensor([tokenizer.bos_token_id, *tokenizer.encode(heldout)])
    stats = calibrate(loaded.model, calibration, batch_size=8, progress=False)
    reference_ppl = perplexity(loaded.model, heldout_stream, window=SEQ_LEN)
    return loaded.model, stats, eval_windows, heldout_stream, reference_ppl


def _quantized(model, stats, level: str, alpha: float | None):
    quantized = copy.deepcopy(model)
    smoothquant(quantized, QuantConfig(level=level, alpha=alpha), stats)
    return quantized


@pytest.mark.slow
@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_smoothed_w8a8_tracks_float_where_naive_does_not(setting, level: str) -> None:
    model, stats, eval_windows, heldout_stream, reference_ppl = setting
    figures = {}
    for name, alpha in (("smoothed", 0.5), ("naive", None)):
        quantized = _quantized(model, stats, level, alpha)
        fidelity = compare_models(model, quantized, eval_windows)
        ppl = perplexity(quantized, heldout_stream, window=SEQ_LEN)
        figures[name] = (fidelity.top1_agreement, ppl / reference_ppl - 1, fidelity.mean_kl)
    print(
        f"\n{level}: reference ppl {reference_ppl:.3f} | "
        + " | ".join(f"{k}: top-1 {t:.2%}, ppl {p:+.2%}, KL {kl:.4f}" for k, (t, p, kl) in figures.items())
    )
    smoothed_top1, smoothed_ppl, _ = figures["smoothed"]
    naive_top1, naive_ppl, _ = figures["naive"]
    assert smoothed_top1 >= 0.97
    assert abs(smoothed_ppl) <= 0.03
    assert naive_top1 <= smoothed_top1 - 0.05
    assert naive_ppl >= smoothed_ppl + 0.02


@pytest.mark.slow
def test_trained_model_predicts_better_than_chance(setting) -> None:
    *_, reference_ppl = setting
    assert reference_ppl < 400  # a flat distribution over 2048 tokens would give 2048
