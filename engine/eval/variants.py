"""The variants `smoothserve eval --compare` puts side by side, each made in memory from the float checkpoint.

    fp16               the float model as loaded (--dtype; auto is float16 on a GPU, float32 on a CPU)
    w8a8               smoothed W8A8 (SmoothQuant, alpha) at the default level
    w8a8-naive         W8A8 without smoothing, the baseline SmoothQuant beats
    w8a8-O3, w8a8-naive-O2, ...   the same at another level (O1 per-token dynamic, O2 per-tensor
                       dynamic, O3 per-tensor static activation scales)

Calibration statistics are gathered once, on the float model, and serve every variant: smoothing
divides them by its own factors (`ActivationStats.divided`). Each variant gets a fresh copy of the
float model from the checkpoint, so only one model is in memory at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.config import QUANT_LEVELS, ModelConfig, QuantConfig
from engine.errors import ConfigError
from engine.models.loader import LoadedModel, load_model
from engine.models.opt import OPTForCausalLM
from engine.quant.calibrate import calibrate
from engine.quant.data import read_texts, token_windows
from engine.quant.quantize import smoothquant
from engine.quant.stats import ActivationStats
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

FLOAT_VARIANTS = ("fp16", "float")


@dataclass(frozen=True)
class Variant:
    name: str
    quant: QuantConfig | None  # None: the float model


@dataclass(frozen=True)
class CalibrationSpec:
    data: str | None  # a .jsonl or text file; None: the training split of the shipped corpus
    num_samples: int = 64
    seq_len: int = 512


def parse_variants(spec: str, default: QuantConfig) -> list[Variant]:
    """`fp16,w8a8-naive,w8a8` -> variants; W8A8 ones take `default`'s alpha, level and granularity
    unless the name says otherwise."""
    variants = []
    for name in (part.strip() for part in spec.split(",")):
        if name in FLOAT_VARIANTS:
            variants.append(Variant(name, None))
            continue
        base, *suffixes = name.split("-")
        naive = "naive" in suffixes
        levels = [s for s in suffixes if s in QUANT_LEVELS]
        if base != "w8a8" or len(levels) > 1 or len(suffixes) != int(naive) + len(levels):
            raise ConfigError(
                f"unknown variant {name!r} in --compare; use fp16, w8a8 or w8a8-naive, optionally with a "
                "level (w8a8-O3, w8a8-naive-O2)"
            )
        alpha = None if naive else (default.alpha if default.alpha is not None else 0.5)
        variants.append(Variant(name, replace(default, alpha=alpha, level=levels[0] if levels else default.level)))
    if len({v.name for v in variants}) != len(variants):
        raise ConfigError(f"--compare names a variant twice: {spec}")
    return variants


def calibration_windows(tokenizer: Tokenizer, spec: CalibrationSpec, max_positions: int) -> tuple[torch.Tensor, str]:
    """Token windows [N, L] to calibrate on, and the name of their source."""
    from engine.tiny_model import CORPUS_RESOURCE, shipped_corpus, split_corpus

    if spec.data is None:
        texts, name = [split_corpus(shipped_corpus())[0]], CORPUS_RESOURCE
    else:
        texts, name = read_texts(spec.data), Path(spec.data).name
    windows = token_windows(tokenizer, texts, spec.num_samples, min(spec.seq_len, max_positions))
    return windows.token_ids, name


def iterate_variants(
    config: ModelConfig, variants: list[Variant], tokenizer: Tokenizer, calibration: CalibrationSpec
) -> Iterator[tuple[Variant, OPTForCausalLM]]:
    """Yield each variant's model in turn; drop it before asking for the next."""
    loaded: LoadedModel | None = load_model(config)
    assert loaded is not None
    if loaded.quant is not None:
        raise ConfigError(
            f"--compare quantizes in memory from the float checkpoint, but {config.model} is already W8A8 "
            f"({loaded.quant.level}); pass its FP16 original"
        )
    stats: ActivationStats | None = None
    if any(v.quant is not None and v.quant.needs_calibration for v in variants):
        windows, source = calibration_windows(tokenizer, calibration, loaded.arch.max_position_embeddings)
        logger.info("calibrating on %d x %d tokens of %s", *windows.shape, source)
        stats = calibrate(loaded.model, windows)
    for variant in variants:
        model = loaded.model if loaded is not None else load_model(config).model
        loaded = None  # the first variant takes the model loaded for calibration
        if variant.quant is not None:
            smoothquant(model, variant.quant, stats)
        yield variant, model
        del model
