"""The smoothserve CLI: the offline workflow end to end, and one clear line for each bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=600, env=_env()
    )


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def assert_one_clear_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("smoothserve: error:")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0]


@pytest.fixture(scope="module")
def calib_jsonl(tmp_path_factory) -> Path:
    from engine.tiny_model import shipped_corpus

    path = tmp_path_factory.mktemp("calib") / "texts.jsonl"
    paragraphs = [p for p in shipped_corpus()[:40_000].split("\n\n") if p.strip()]
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return path


def test_make_quantize_eval_workflow(tmp_path, calib_jsonl) -> None:
    model_dir, w8a8_dir = tmp_path / "tiny-opt", tmp_path / "tiny-opt-w8a8"
    made = run_cli("make-tiny-model", str(model_dir), "--num-layers", "2", "--outliers", "--train-steps", "5")
    assert made.returncode == 0, made.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model_dir.iterdir()}

    quantized = run_cli(
        "quantize", "--model", str(model_dir), "--calib-data", str(calib_jsonl), "--alpha", "0.5",
        "--level", "O3", "--num-samples", "8", "--seq-len", "64", "--out", str(w8a8_dir),
    )  # fmt: skip
    assert quantized.returncode == 0, quantized.stderr
    assert "wrote W8A8 O3 alpha=0.5" in quantized.stdout
    record = json.loads((w8a8_dir / "quant_config.json").read_text())
    assert record["calibration"] == {"dataset": "texts.jsonl", "num_samples": 8, "seq_len": 64}

    for directory, variant in ((model_dir, "float32"), (w8a8_dir, "W8A8 O3")):
        evaluated = run_cli("eval", "--model", str(directory), "--data", str(calib_jsonl), "--window", "64",
                            "--limit-tokens", "300")  # fmt: skip
        assert evaluated.returncode == 0, evaluated.stderr
        assert f"[{variant}] perplexity" in evaluated.stdout


def test_missing_model_directory(tmp_path, calib_jsonl) -> None:
    result = run_cli("quantize", "--model", str(tmp_path / "nope"), "--calib-data", str(calib_jsonl),
                     "--out", str(tmp_path / "out"))  # fmt: skip
    assert_one_clear_error(result, "model directory not found")


def test_config_that_is_not_opt(tiny_model_dir, tmp_path, calib_jsonl) -> None:
    model_dir = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    result = run_cli("eval", "--model", str(model_dir), "--data", str(calib_jsonl))
    assert_one_clear_error(result, "not an OPT model: config.json has model_type='gpt2'")


def test_corrupt_safetensors(tiny_model_dir, tmp_path, calib_jsonl) -> None:
    model_dir = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # truncated download
    result = run_cli("eval", "--model", str(model_dir), "--data", str(calib_jsonl))
    assert_one_clear_error(result, "cannot read safetensors file model.safetensors")


def test_empty_calibration_file(tiny_model_dir, tmp_path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = run_cli("quantize", "--model", str(tiny_model_dir), "--calib-data", str(empty),
                     "--out", str(tmp_path / "out"))  # fmt: skip
    assert_one_clear_error(result, "contains no text")


def test_calibration_line_without_text(tiny_model_dir, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    result = run_cli("quantize", "--model", str(tiny_model_dir), "--calib-data", str(bad),
                     "--out", str(tmp_path / "out"))  # fmt: skip
    assert_one_clear_error(result, 'line 2 has no string field "text"')


def test_post_ln_model_refuses_smoothing_but_quantizes_naively(tiny_post_ln_model_dir, tmp_path, calib_jsonl) -> None:
    common = ("--model", str(tiny_post_ln_model_dir), "--calib-data", str(calib_jsonl), "--num-samples", "2",
              "--seq-len", "32")  # fmt: skip
    smoothed = run_cli("quantize", *common, "--out", str(tmp_path / "a"))
    assert_one_clear_error(smoothed, "smoothing needs pre-LayerNorm OPT")
    naive = run_cli("quantize", *common, "--no-smooth", "--out", str(tmp_path / "b"))
    assert naive.returncode == 0, naive.stderr
    assert "naive (no smoothing)" in naive.stdout


def test_unknown_shape(tmp_path) -> None:
    assert_one_clear_error(run_cli("make-tiny-model", str(tmp_path / "m"), "--shape", "opt-7b"), "unknown shape")
