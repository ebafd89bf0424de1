"""smoothserve's engine: the OPT model in FP16 and SmoothQuant W8A8, quantization, and serving logic."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "SamplingParams"]


def __getattr__(name: str) -> Any:  # lazy: `import engine` stays light for the CLI and the server
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine

        return LLMEngine
    if name == "SamplingParams":
        from engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
