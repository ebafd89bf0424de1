"""`smoothserve eval`: LAMBADA accuracies and perplexity agree with a direct computation through
transformers' own OPT; --compare makes the same W8A8 model in memory that `quantize` saves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.cli import main
from engine.tiny_model import shipped_corpus, split_corpus

NUM_PASSAGES, LIMIT = 14, 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and lose much when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoTokenizer, OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _greedy(model, ids: list[int], count: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=count, do_sample=False, min_new_tokens=count)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def lambada_jsonl(hf, tmp_path_factory) -> Path:
    """Passages of the corpus; half end as the model itself would continue them (so some are hits)."""
    model, tokenizer = hf
    lines = [line.strip() for line in split_corpus(shipped_corpus())[1].splitlines() if len(line.split()) >= 4]
    texts = []
    for index, line in enumerate(lines[:NUM_PASSAGES]):
        if index % 2 == 0:
            line += tokenizer.decode(_greedy(model, tokenizer(line).input_ids, 3))
        texts.append(line.rstrip())
    path = tmp_path_factory.mktemp("lambada") / "lambada_validation.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def reference_lambada(hf, texts: list[str]) -> tuple[float, float]:
    """Last-token accuracy as the SmoothQuant demo computes it; last-word accuracy by greedy generation."""
    model, tokenizer = hf
    token_hits = word_hits = 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids  # BOS + text
        with torch.no_grad():
            token_hits += int(model(ids).logits[0, -2].argmax().item() == ids[0, -1].item())
        context, _, word = text.rpartition(" ")
        target = tokenizer(" " + word, add_special_tokens=False).input_ids
        word_hits += int(_greedy(model, tokenizer(context).input_ids, len(target)) == target)
    return token_hits / len(texts), word_hits / len(texts)


def run_eval(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["eval", "--device", "cpu", "--dtype", "float32", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_lambada_accuracies_match_transformers(tiny_model_dir, hf, lambada_jsonl, tmp_path, capsys) -> None:
    texts = [json.loads(line)["text"] for line in lambada_jsonl.read_text().splitlines()][:LIMIT]
    token_accuracy, word_accuracy = reference_lambada(hf, texts)
    assert 0 < token_accuracy < 1 and 0 < word_accuracy < 1  # the data can tell right from wrong

    out = tmp_path / "lambada.json"
    code, stdout, _ = run_eval(capsys, "--model", str(tiny_model_dir), "--task", "lambada", "--data",
                               str(lambada_jsonl), "--limit", str(LIMIT), "--out", str(out))  # fmt: skip
    assert code == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["num_samples"] == LIMIT
    assert row["metrics"]["last_token_accuracy"] == pytest.approx(token_accuracy)
    assert row["metrics"]["last_word_accuracy"] == pytest.approx(word_accuracy)
    assert row["latency_ms"] > 0 and row["size_gb"] > 0
    assert f"last-token accuracy {token_accuracy:.2%}" in stdout and "latency (ms/sample)" in stdout


def reference_perplexity(hf, text: str, window: int, stride: int) -> tuple[float, int]:
    """Sliding windows as in transformers' perplexity guide, each token scored once (token 0 is BOS)."""
    model, tokenizer = hf
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    nll, scored_until = 0.0, 1
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        if end > scored_until:
            with torch.no_grad():
                logits = model(ids[None, begin:end]).logits[0]
            nll += F.cross_entropy(logits[scored_until - begin - 1 : -1], ids[scored_until:end], reduction="sum").item()
            scored_until = end
    assert scored_until == len(ids)
    return math.exp(nll / (len(ids) - 1)), len(ids) - 1


def test_perplexity_matches_transformers(tiny_model_dir, hf, tmp_path, capsys) -> None:
    text = split_corpus(shipped_corpus())[1][:3000]
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(text)
    expected, num_tokens = reference_perplexity(hf, text, window=64, stride=24)
    out = tmp_path / "ppl.json"
    code, stdout, _ = run_eval(capsys, "--model", str(tiny_model_dir), "--task", "perplexity", "--data", str(raw),
                               "--window", "64", "--stride", "24", "--out", str(out))  # fmt: skip
    assert code == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["metrics"]["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert row["metrics"]["tokens"] == num_tokens
    assert row["num_samples"] == math.ceil((num_tokens + 1 - 64) / 24) + 1  # windows until the end is reached
    assert f"on {num_tokens} tokens of wiki.test.raw" in stdout


@pytest.fixture(scope="module")
def calib_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    paragraphs = [p for p in split_corpus(shipped_corpus())[0][:20_000].split("\n\n") if p.strip()]
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return path


@pytest.fixture(scope="module")
def w8a8_dir(tiny_outlier_model_dir, calib_jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w8a8") / "tiny-w8a8"
    code = main(["quantize", "--model", str(tiny_outlier_model_dir), "--calib-data", str(calib_jsonl),
                 "--level", "O3", "--num-samples", "4", "--seq-len", "48", "--device", "cpu", "--dtype", "float32",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    return out


def test_compare_builds_each_variant_like_quantize_does(
    tiny_outlier_model_dir, w8a8_dir, calib_jsonl, tmp_path, capsys
) -> None:
    text = tmp_path / "heldout.txt"
    text.write_text(split_corpus(shipped_corpus())[1][:2000])
    common = ("--task", "perplexity", "--data", str(text), "--window", "48")
    saved, compared = tmp_path / "saved.json", tmp_path / "compared.json"
    assert run_eval(capsys, "--model", str(w8a8_dir), *common, "--out", str(saved))[0] == 0
    code, stdout, _ = run_eval(
        capsys, "--model", str(tiny_outlier_model_dir), *common, "--compare", "fp16,w8a8-naive-O3,w8a8-O3",
        "--calib-data", str(calib_jsonl), "--calib-samples", "4", "--calib-seq-len", "48", "--out", str(compared),
    )  # fmt: skip
    assert code == 0
    (checkpoint,) = json.loads(saved.read_text())["results"]
    rows = {row["variant"]: row for row in json.loads(compared.read_text())["results"]}
    assert list(rows) == ["fp16 (float32)", "w8a8-naive-O3 (O3)", "w8a8-O3 (O3, alpha 0.5)"]
    smoothed, naive, fp = rows["w8a8-O3 (O3, alpha 0.5)"], rows["w8a8-naive-O3 (O3)"], rows["fp16 (float32)"]
    assert smoothed["metrics"]["perplexity"] == pytest.approx(checkpoint["metrics"]["perplexity"], rel=1e-6)
    assert smoothed["size_gb"] == pytest.approx(checkpoint["size_gb"])
    assert naive["metrics"]["perplexity"] != smoothed["metrics"]["perplexity"]
    # int8 decoder weights: well under the float32 model, which only its float embeddings keep from a 4x cut
    assert smoothed["size_gb"] < 0.7 * fp["size_gb"]
    assert stdout.count("| ") >= 3 * 4  # a table row per variant


def assert_one_clear_error(code: int, stderr: str, expected: str) -> None:
    assert code == 2
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("smoothserve: error:")]
    assert len(errors) == 1 and expected in errors[0], stderr


def test_missing_data_file_is_one_clear_error(tiny_model_dir, tmp_path, capsys) -> None:
    code, _, stderr = run_eval(capsys, "--model", str(tiny_model_dir), "--task", "lambada",
                               "--data", str(tmp_path / "lambada.jsonl"))  # fmt: skip
    assert_one_clear_error(code, stderr, "evaluation file not found")


def test_unknown_compare_variant_is_one_clear_error(tiny_model_dir, lambada_jsonl, capsys) -> None:
    code, _, stderr = run_eval(capsys, "--model", str(tiny_model_dir), "--task", "lambada", "--data",
                               str(lambada_jsonl), "--compare", "fp16,w4a16")  # fmt: skip
    assert_one_clear_error(code, stderr, "unknown variant 'w4a16'")


def test_compare_refuses_a_w8a8_checkpoint(w8a8_dir, lambada_jsonl, capsys) -> None:
    code, _, stderr = run_eval(capsys, "--model", str(w8a8_dir), "--task", "lambada", "--data", str(lambada_jsonl),
                               "--compare", "fp16,w8a8")  # fmt: skip
    assert_one_clear_error(code, stderr, "already W8A8")


def test_hub_data_set_without_datasets_or_internet_is_one_clear_error(tiny_model_dir, capsys, monkeypatch) -> None:
    import importlib.util

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, stderr = run_eval(capsys, "--model", str(tiny_model_dir), "--task", "lambada", "--data",
                               "no-such-user/no-such-lambada")  # fmt: skip
    if importlib.util.find_spec("datasets") is None:
        assert_one_clear_error(code, stderr, "needs the optional package `datasets`")
    else:
        assert_one_clear_error(code, stderr, "cannot load data set 'no-such-user/no-such-lambada'")
