"""The eval table, as SmoothQuant users know it: model size, accuracy (or perplexity), latency per sample."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.table import align_columns


@dataclass(frozen=True)
class EvalRow:
    variant: str
    size_gb: float  # parameters and buffers in memory
    num_samples: int  # LAMBADA passages, or perplexity windows (forward passes)
    latency_ms: float  # mean forward pass per sample
    metrics: dict[str, float]  # last_token_accuracy and last_word_accuracy, or perplexity and tokens


COLUMNS = {  # metric key -> (header, format)
    "last_token_accuracy": ("last-token acc", "{:.2%}"),
    "last_word_accuracy": ("last-word acc", "{:.2%}"),
    "perplexity": ("perplexity", "{:.4f}"),
}


def format_table(rows: list[EvalRow]) -> str:
    metric_keys = [key for key in COLUMNS if key in rows[0].metrics]
    header = ["variant", "size (GB)", *(COLUMNS[k][0] for k in metric_keys), "latency (ms/sample)", "samples"]
    body = [
        [row.variant, f"{row.size_gb:.3f}", *(COLUMNS[k][1].format(row.metrics[k]) for k in metric_keys),
         f"{row.latency_ms:.2f}", str(row.num_samples)]
        for row in rows
    ]  # fmt: skip
    lines = align_columns([header, *body])
    rule = "".join("|" if c == "|" else "-" for c in lines[0])
    return "\n".join([lines[0], rule, *lines[1:]])


def write_json(rows: list[EvalRow], path: str | Path, context: dict[str, object]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**context, "results": [asdict(row) for row in rows]}, indent=2) + "\n")
    return out
