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
                            "--out", str(tmp_path)])  # fmt: skip
    written = json.loads((tmp_path / "fidelity-cpu.json").read_text())
    variants = written["results"]["tiny"]["variants"]
    expected = [(level, smoothed) for level in ("O1", "O2", "O3") for smoothed in (True, False)]
    assert [(v["level"], v["smoothed"]) for v in variants] == expected
    assert all(v["mean_kl"] >= 0 and 0 <= v["top1_agreement"] <= 1 for v in variants)
    assert len(report["targets"]) == 3
    assert "| tiny | O3 | naive |" in (tmp_path / "fidelity-cpu.md").read_text()
