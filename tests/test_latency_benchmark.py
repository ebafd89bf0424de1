"""The latency benchmark's code path, smoke-run on the CPU at the tiny shape (its numbers mean nothing
here; the GPU run writes benchmarks/results/latency-<device>.*)."""

from __future__ import annotations

import json

from benchmarks import latency


def test_latency_benchmark_runs_every_variant_and_writes_its_report(tmp_path) -> None:
    report = latency.main(["--device", "cpu", "--models", "tiny", "--prefill", "8,24", "--batches", "1,3",
                           "--context", "20", "--reps", "1", "--out", str(tmp_path)])  # fmt: skip
    written = json.loads((tmp_path / "latency-cpu.json").read_text())
    assert written["results"].keys() == {"tiny"}
    assert set(written["results"]["tiny"]) == set(latency.VARIANTS)
    for variant, result in written["results"]["tiny"].items():
        assert [p["tokens"] for p in result["prefill"]] == [8, 24], variant
        assert all(p["ms"] > 0 for p in result["prefill"]), variant
        assert [d["batch"] for d in result["decode"]] == [1, 3], variant
        assert all(d["ms"] > 0 for d in result["decode"]), variant
    tiny = written["results"]["tiny"]
    # int8 weights: the W8A8 linear layers hold a quarter of the float32 bytes; embeddings stay float
    assert tiny["w8a8-O1"]["weights_gb"] < 0.7 * tiny["fp16"]["weights_gb"]
    assert tiny["fp16"]["kv_capacity_tokens"] >= 3 * 21
    assert report["targets"] == []  # OPT-30B targets only when OPT-30B was measured
    assert "| tiny | w8a8-O3 |" in (tmp_path / "latency-cpu.md").read_text()
