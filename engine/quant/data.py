"""Calibration text: read a .jsonl or plain-text file and cut its tokens into fixed-length windows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import CalibrationError
from engine.tokenizer import Tokenizer


def read_texts(path: str | Path, what: str = "calibration") -> list[str]:
    """A .jsonl file gives the "text" field of each line; any other file is one text.

    `what` names the file's role in error messages ("calibration", "evaluation").
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{what} file not found: {path}")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CalibrationError(f"cannot read {what} file {path} as UTF-8 text ({error})") from None
    if path.suffix != ".jsonl":
        texts = [raw]
    else:
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise CalibrationError(f"{path} line {number} is not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CalibrationError(f'{path} line {number} has no string field "text"')
            texts.append(record["text"])
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationError(f"{what} file {path} contains no text")
    return texts


@dataclass(frozen=True)
class TokenWindows:
    token_ids: torch.Tensor  # int64 [num_windows, seq_len], each row starting with BOS
    num_tokens: int  # tokens of text the windows were cut from


def token_windows(tokenizer: Tokenizer, texts: list[str], num_samples: int, seq_len: int) -> TokenWindows:
    """Concatenate the texts (EOS between them) and cut up to `num_samples` windows of `seq_len`.

    Each window is BOS followed by seq_len - 1 text tokens, as OPT saw its training data. Text too
    short for one full window gives a single shorter window.
    """
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text))
        stream.append(tokenizer.eos_token_id)
    body = seq_len - 1
    count = min(num_samples, len(stream) // body)
    if count == 0:
        if len(stream) < 2:
            raise CalibrationError("calibration text is too short: it gives fewer than 2 tokens")
        body, count = len(stream), 1
    rows = [[tokenizer.bos_token_id, *stream[i * body : (i + 1) * body]] for i in range(count)]
    return TokenWindows(torch.tensor(rows, dtype=torch.long), len(stream))
