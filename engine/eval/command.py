"""`smoothserve eval`: its arguments and what it does with them.

    smoothserve eval --model facebook/opt-30b --task lambada --data lambada_validation.jsonl --limit 1000 \
        --compare fp16,w8a8-naive,w8a8
    smoothserve eval --model ./opt-13b-w8a8 --task perplexity --data wiki.test.raw
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from engine.config import QUANT_LEVELS, WEIGHT_GRANULARITIES, ModelConfig, QuantConfig
from engine.errors import ConfigError
from engine.eval.report import EvalRow, format_table, write_json
from engine.eval.settings import TASKS, EvalSettings

if TYPE_CHECKING:
    import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (FP16 or W8A8) or hub name")
    parser.add_argument("--task", choices=TASKS, default="perplexity")
    parser.add_argument(
        "--data", required=True,
        help="a .jsonl file with a text field, a text file (LAMBADA: one passage per line), or a Hugging Face "
             "data set NAME[:CONFIG] (needs the `datasets` package and the internet)",
    )  # fmt: skip
    parser.add_argument("--split", help="data set split (default: validation for lambada, test for perplexity)")
    parser.add_argument("--limit", type=int, help="use only the first N samples (LAMBADA passages, or texts)")
    parser.add_argument("--window", type=int, default=1024, help="perplexity: tokens per window (default 1024)")
    parser.add_argument("--stride", type=int, help="perplexity: window stride (default window/2)")
    parser.add_argument("--limit-tokens", type=int, help="perplexity: score only the first N tokens")
    parser.add_argument(
        "--compare",
        help="comma-separated variants made in memory from the float checkpoint: fp16, w8a8 (smoothed), "
             "w8a8-naive, or with a level: w8a8-O3, w8a8-naive-O2",
    )  # fmt: skip
    parser.add_argument("--level", choices=QUANT_LEVELS, default="O1", help="default level of --compare variants")
    parser.add_argument("--alpha", type=float, default=0.5, help="smoothing strength of w8a8 variants (default 0.5)")
    parser.add_argument("--weight-granularity", choices=WEIGHT_GRANULARITIES, default="per_channel")
    parser.add_argument("--calib-data", help="calibration text for --compare (default: the shipped corpus)")
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration sequences (default 64)")
    parser.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto")


def _check(args: argparse.Namespace) -> None:
    for name in ("limit", "limit_tokens", "calib_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.window < 2:
        raise ConfigError(f"--window must be >= 2, got {args.window}")
    if args.stride is not None and not 1 <= args.stride <= args.window:
        raise ConfigError(f"--stride must be in [1, --window], got {args.stride} for window {args.window}")
    if args.calib_seq_len < 2:
        raise ConfigError(f"--calib-seq-len must be >= 2, got {args.calib_seq_len}")


def _dtype_name(model: torch.nn.Module) -> str:
    return str(model.decoder.embed_tokens.weight.dtype).replace("torch.", "")


def _summary(model_name: str, row: EvalRow, data_name: str, settings: EvalSettings) -> str:
    if settings.task == "lambada":
        return (
            f"{model_name} [{row.variant}] LAMBADA last-token accuracy {row.metrics['last_token_accuracy']:.2%}, "
            f"last-word accuracy {row.metrics['last_word_accuracy']:.2%} on {row.num_samples} passages of {data_name}"
        )
    return (
        f"{model_name} [{row.variant}] perplexity {row.metrics['perplexity']:.4f} on {int(row.metrics['tokens'])} "
        f"tokens of {data_name} (window {int(row.metrics['window'])}, {row.num_samples} windows)"
    )


def run(args: argparse.Namespace) -> int:
    from engine.eval.data import load_eval_texts
    from engine.eval.run import evaluate_model, prepare_inputs
    from engine.eval.variants import CalibrationSpec, iterate_variants, parse_variants
    from engine.models.loader import load_model, resolve_model_dir
    from engine.tokenizer import load_tokenizer

    _check(args)
    variants = None
    if args.compare:
        default = QuantConfig(level=args.level, alpha=args.alpha, weight_granularity=args.weight_granularity)
        variants = parse_variants(args.compare, default)
    if args.calib_data and not args.compare:
        raise ConfigError("--calib-data is for --compare (a W8A8 checkpoint carries its own calibration)")
    split = args.split or ("validation" if args.task == "lambada" else "test")
    data = load_eval_texts(args.data, per_line=args.task == "lambada", split=split, limit=args.limit)
    model_config = ModelConfig(model=args.model, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(resolve_model_dir(args.model))
    settings = EvalSettings(task=args.task, window=args.window, stride=args.stride, limit_tokens=args.limit_tokens)
    inputs = prepare_inputs(settings, tokenizer, data.texts)
    if settings.task == "perplexity" and len(inputs) < 2:
        raise ConfigError(f"{data.name} gives fewer than 2 tokens; perplexity needs more text")

    started = time.perf_counter()
    rows: list[EvalRow] = []
    if variants is None:
        loaded = load_model(model_config)
        label = f"W8A8 {loaded.quant.level}" if loaded.quant else _dtype_name(loaded.model)
        rows.append(evaluate_model(loaded.model, inputs, settings, label))
        print(_summary(args.model, rows[-1], data.name, settings), flush=True)
    else:
        calibration = CalibrationSpec(args.calib_data, args.calib_samples, args.calib_seq_len)
        for variant, model in iterate_variants(model_config, variants, tokenizer, calibration):
            if variant.quant is None:
                label = f"{variant.name} ({_dtype_name(model)})"
            else:
                recipe = f", alpha {variant.quant.alpha}" if variant.quant.smoothed else ""
                label = f"{variant.name} ({variant.quant.level}{recipe})"
            rows.append(evaluate_model(model, inputs, settings, label))
            del model  # before the next variant is loaded
            print(_summary(args.model, rows[-1], data.name, settings), flush=True)
    print()
    print(format_table(rows))
    print(f"({time.perf_counter() - started:.1f} s)")
    if args.out:
        context = {"model": args.model, "task": args.task, "data": data.name, "window": settings.window,
                   "stride": settings.stride, "device": args.device, "dtype": args.dtype}  # fmt: skip
        print(f"wrote {write_json(rows, args.out, context)}")
    return 0
