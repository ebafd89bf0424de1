"""Evaluation text: a local file, or a Hugging Face data set where the machine has the internet.

Local files: `.jsonl` with a "text" field per line, or plain text. For LAMBADA a plain-text file holds
one passage per line; for perplexity it is one text (e.g. wikitext's `wiki.test.raw`). A name that is
not a local file, such as `lambada` or `wikitext:wikitext-2-raw-v1`, is loaded with the optional
`datasets` package (NAME[:CONFIG], the split chosen by `split`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import DataError
from engine.quant.data import read_texts

LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".raw", ".text")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


@dataclass(frozen=True)
class EvalTexts:
    texts: list[str]
    name: str  # what the report calls the data: the file name, or NAME[:CONFIG]/split


def load_eval_texts(source: str, per_line: bool, split: str, limit: int | None = None) -> EvalTexts:
    """The texts of `source`, the first `limit` of them. `per_line`: a plain-text file holds one
    sample per line (LAMBADA) rather than one text (perplexity)."""
    path = Path(source).expanduser()
    if path.exists() or _looks_local(source):
        texts = read_texts(path, what="evaluation")
        if per_line and path.suffix != ".jsonl":
            texts = [line for text in texts for line in text.splitlines() if line.strip()]
        name = path.name
    else:
        texts = _load_hub_dataset(source, split)
        name = f"{source}/{split}"
    return EvalTexts(texts[:limit] if limit else texts, name)


def _looks_local(source: str) -> bool:
    return (
        source.startswith((".", "/", "~")) or Path(source).suffix in LOCAL_SUFFIXES or not _DATASET_NAME.match(source)
    )


def _load_hub_dataset(source: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source!r} is not a local file; reading a Hugging Face data set needs the optional package "
            "`datasets` (pip install 'smoothserve[eval]'), or pass a local .jsonl or text file"
        ) from None
    name, _, config = source.partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as error:  # offline, unknown name, unknown split: all mean "cannot get it"
        raise DataError(
            f"cannot load data set {source!r} (split {split!r}) from the Hugging Face hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); download it and pass a local .jsonl or text file"
        ) from None
    if "text" not in dataset.column_names:
        raise DataError(f"data set {source!r} has no 'text' column (columns: {', '.join(dataset.column_names)})")
    texts = [t for t in dataset["text"] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"data set {source!r} (split {split!r}) contains no text")
    return texts
