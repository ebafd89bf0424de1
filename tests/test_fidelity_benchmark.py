"""The fidelity-at-scale benchmark's code path, smoke-run on the CPU at the tiny shape."""

from __future__ import annotations

import json

import torch

from benchmarks import fidelity
from benchmarks.latency import architecture


def test_planted_outliers_preserve_the_function() -> None:
    arch = architecture("tiny")
    plain = fidelity.build_float_model(arch, torch.device("cpu"), torch.float32, outliers=0)
    planted = fidelity.build_float_model(arch, torch.device("cpu"), torch.float32, outliers=4)
    norm = planted.decoder.layers[0].final_layer_norm.weight
    assert norm.abs().max() > 15 * norm.abs().median()  # the outliers are there ...
    tokens = torch.randint(4, arch.vocab_size, (2, 16))
    torch.testing.assert_close(planted.score(tokens), plain.score(tokens), rtol=1e-4, atol=1e-4)  # ... and harmless


def test_fidelity_benchmark_writes_every_variant(tmp_path) -> None:
    report = fidelity.main(["--device", "cpu", "--models", "tiny", "--calib", "2", "--eval", "2", "--seq-len", "16",
                            "--kv-chunk", "4", "--out", str(tmp_path)])  # fmt: skip
    written = json.loads((tmp_path / "fidelity-cpu.json").read_text())
    variants = written["results"]["tiny"]["variants"]
    expected = [(level, smoothed, "fp16") for level in ("O1", "O2", "O3") for smoothed in (True, False)]
    expected.insert(5, ("O3", True, "int8"))  # smoothed O3 again, through an int8 KV cache
    assert [(v["level"], v["smoothed"], v["kv_cache"]) for v in variants] == expected
    assert variants[5]["kl_to_fp16_kv"] > 0
    assert all(v["mean_kl"] >= 0 and 0 <= v["top1_agreement"] <= 1 for v in variants)
    assert len(report["targets"]) == 3
    assert "| tiny | O3 | naive | fp16 |" in (tmp_path / "fidelity-cpu.md").read_text()


def test_chunked_scoring_through_the_cache_matches_the_no_cache_forward() -> None:
    from engine.eval.fidelity import score_through_kv_cache

    model = fidelity.build_float_model(architecture("tiny"), torch.device("cpu"), torch.float32, outliers=2)
    tokens = torch.randint(4, model.arch.vocab_size, (37,), generator=torch.Generator().manual_seed(0))
    direct = model.score(tokens[None])[0]
    torch.testing.assert_close(score_through_kv_cache(model, tokens, 8, quantized_kv=False), direct,
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    int8 = score_through_kv_cache(model, tokens, 8, quantized_kv=True)
    difference = (int8 - direct).abs().max().item()
    assert 0 < difference < 0.05 * direct.abs().max().item()  # the int8 prefix moves logits, a little
    assert all(layer.self_attn.attn.kv_cache is None for layer in model.decoder.layers)
