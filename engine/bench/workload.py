"""The prompts of a benchmark, as token ids of known length.

`random`: windows of `input_len` tokens (BOS first) cut at seeded random offsets from the shipped
corpus, tokenized by the server's own /tokenize, so lengths are exact for any served model and no
tokenizer is needed on the client. A file: one prompt per line of a text file, or the "prompt" (or
"text") field of each line of a .jsonl; cut to `input_len` tokens when it is given. Every request
asks for `output_len` tokens with `ignore_eos`, so output lengths are exact too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx

from engine.errors import DataError

CORPUS_CHARS = 400_000  # enough text for windows of any context length we serve


def tokenize(client: httpx.Client, text: str) -> list[int]:
    response = client.post("/tokenize", json={"prompt": text, "add_special_tokens": True})
    response.raise_for_status()
    return response.json()["tokens"]


def random_prompts(client: httpx.Client, num_prompts: int, input_len: int, seed: int) -> list[list[int]]:
    from engine.tiny_model import shipped_corpus

    stream = tokenize(client, shipped_corpus()[:CORPUS_CHARS])
    bos, body = stream[:1], stream[1:]
    if input_len < 2 or input_len - 1 > len(body):
        raise DataError(f"--input-len must be in [2, {len(body) + 1}] for the random data set, got {input_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(body) - (input_len - 1) + 1) for _ in range(num_prompts)]
    return [bos + body[s : s + input_len - 1] for s in starts]


def read_prompt_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"benchmark data file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read benchmark data file {path} as UTF-8 text ({error})") from None
    if path.suffix != ".jsonl":
        texts = lines
    else:
        texts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record.get("prompt", record.get("text"))
            except (json.JSONDecodeError, AttributeError):
                raise DataError(f"{path} line {number} is not a JSON object") from None
            if not isinstance(text, str):
                raise DataError(f'{path} line {number} has no string field "prompt" or "text"')
            texts.append(text)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"benchmark data file {path} contains no prompts")
    return texts


def file_prompts(client: httpx.Client, path: Path, num_prompts: int, input_len: int | None) -> list[list[int]]:
    """The file's prompts in order (repeated if there are fewer than `num_prompts`)."""
    texts = read_prompt_texts(path)
    chosen = [texts[i % len(texts)] for i in range(num_prompts)]
    cache: dict[str, list[int]] = {}
    prompts = []
    for text in chosen:
        if text not in cache:
            cache[text] = tokenize(client, text)
        prompts.append(cache[text][:input_len] if input_len else cache[text])
    return prompts
