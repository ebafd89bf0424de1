"""What an evaluation runs: the task and its knobs (no torch here, so the CLI parser stays light)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Task = Literal["lambada", "perplexity"]
TASKS: tuple[str, ...] = ("lambada", "perplexity")


@dataclass(frozen=True)
class EvalSettings:
    task: Task
    window: int = 1024  # perplexity: tokens per forward pass
    stride: int | None = None  # perplexity: default window // 2
    limit_tokens: int | None = None  # perplexity: score only the first N tokens
    progress: bool = True
