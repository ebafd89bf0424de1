"""Calibration text, token windows, the trained tokenizer and perplexity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.errors import CalibrationError
from engine.eval.perplexity import perplexity
from engine.quant.data import read_texts, token_windows
from engine.tiny_model import shipped_corpus, split_corpus
from engine.tokenizer import load_tokenizer
from tests.conftest import load_cpu


def test_tokenizer_round_trips_text_and_starts_inputs_with_bos(tiny_model_dir) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    text = "Now is the winter of our discontent, café ✓"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == 2
    assert tokenizer.hf(text).input_ids == [2, *ids]  # like OPT's GPT-2 tokenizer
    assert len(ids) < len(text) / 2  # the BPE merges common words


def test_corpus_split_keeps_heldout_text_apart() -> None:
    corpus = shipped_corpus()
    train, heldout = split_corpus(corpus)
    assert train + heldout == corpus
    assert 0.08 < len(heldout) / len(corpus) < 0.12
    assert len(corpus) > 200_000


def test_read_texts_formats(tmp_path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "meta": 1}\n')
    assert read_texts(tmp_path / "a.jsonl") == ["one", "two"]
    (tmp_path / "b.txt").write_text("plain text\nfile\n")
    assert read_texts(tmp_path / "b.txt") == ["plain text\nfile\n"]
    (tmp_path / "c.jsonl").write_text("not json\n")
    with pytest.raises(CalibrationError, match="line 1 is not valid JSON"):
        read_texts(tmp_path / "c.jsonl")
    with pytest.raises(CalibrationError, match="not found"):
        read_texts(tmp_path / "absent.jsonl")


def test_token_windows(tiny_model_dir) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    windows = token_windows(tokenizer, ["To be, or not to be", "that is the question"], 100, 4)
    stream = [*tokenizer.encode("To be, or not to be"), 2, *tokenizer.encode("that is the question"), 2]
    assert windows.num_tokens == len(stream)
    assert windows.token_ids.shape == (len(stream) // 3, 4)
    assert (windows.token_ids[:, 0] == tokenizer.bos_token_id).all()
    assert windows.token_ids[:, 1:].reshape(-1).tolist() == stream[: len(stream) // 3 * 3]
    short = token_windows(tokenizer, ["Hi"], 8, 512)
    assert short.token_ids.shape[0] == 1 and short.token_ids.shape[1] < 512


def _direct_perplexity(model, ids: torch.Tensor) -> float:
    logits = model.score(ids[None])[0]
    return math.exp(F.cross_entropy(logits[:-1], ids[1:]).item())


def test_perplexity_with_one_window_is_the_direct_computation(tiny_model_dir) -> None:
    model = load_cpu(tiny_model_dir).model
    ids = torch.randint(4, 2000, (90,), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, ids, window=128) == pytest.approx(_direct_perplexity(model, ids), rel=1e-5)


def test_sliding_window_scores_each_token_once_with_context(tiny_model_dir) -> None:
    model = load_cpu(tiny_model_dir).model
    tokenizer = load_tokenizer(tiny_model_dir)
    _, heldout = split_corpus(shipped_corpus())
    ids = torch.tensor([2, *tokenizer.encode(heldout[:3000])])[:300]
    window, stride = 64, 16
    nll, scored = 0.0, 1
    for start in range(0, len(ids) - 1, stride):  # independent, straightforward version
        end = min(start + window, len(ids))
        logits = model.score(ids[start:end][None])[0]
        for position in range(max(scored, start + 1), end):
            nll -= torch.log_softmax(logits[position - start - 1], -1)[ids[position]].item()
        scored = max(scored, end)
    expected = math.exp(nll / (len(ids) - 1))
    assert perplexity(model, ids, window=window, stride=stride) == pytest.approx(expected, rel=1e-5)
