"""The `smoothserve` command line.

Errors meant for the user (`SmoothServeError`) print as one line and exit with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from engine.config import KV_CACHE_DTYPES, CalibrationConfig, ModelConfig, QuantConfig
from engine.errors import SmoothServeError

logger = logging.getLogger("smoothserve")


def _dir_size_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 1e9


# --------------------------------------------------------------------------------------------------
# make-tiny-model


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from engine.tiny_model import TinyModelSpec, make_tiny_model, resolve_shape

    shape = resolve_shape(
        args.shape,
        {
            "hidden_size": args.hidden_size,
            "num_layers": args.num_layers,
            "num_heads": args.num_heads,
            "ffn_dim": args.ffn_dim,
            "max_position_embeddings": args.max_positions,
            "word_embed_proj_dim": args.word_embed_proj_dim,
            "vocab_size": args.vocab_size,
            "do_layer_norm_before": False if args.post_ln else None,
        },
    )
    spec = TinyModelSpec(
        shape=shape,
        seed=args.seed,
        tokenizer_vocab_size=args.tokenizer_vocab_size,
        train_steps=args.train_steps,
        outliers=args.outliers,
        num_outlier_channels=args.outlier_channels,
        dtype=args.dtype,
        corpus=Path(args.corpus) if args.corpus else None,
    )
    if spec.corpus is not None and not spec.corpus.is_file():
        raise SmoothServeError(f"corpus file not found: {spec.corpus}")
    out = make_tiny_model(args.dir, spec)
    print(f"wrote OPT model ({shape.hidden_size}d x {shape.num_layers} layers) to {out}")
    return 0


# --------------------------------------------------------------------------------------------------
# quantize


def cmd_quantize(args: argparse.Namespace) -> int:
    from engine.models.loader import load_model
    from engine.quant.calibrate import calibrate
    from engine.quant.checkpoint import save_w8a8
    from engine.quant.data import read_texts, token_windows
    from engine.quant.quantize import smoothquant
    from engine.tokenizer import load_tokenizer

    alpha = None if args.no_smooth else args.alpha
    texts = read_texts(args.calib_data)  # fail on bad calibration data before loading a large model
    loaded = load_model(ModelConfig(model=args.model, dtype=args.dtype, device=args.device))
    if loaded.quant is not None:
        raise SmoothServeError(f"{args.model} is already a W8A8 checkpoint; quantize its FP16 original")
    if args.seq_len > loaded.arch.max_position_embeddings:
        raise SmoothServeError(
            f"--seq-len {args.seq_len} exceeds the model's {loaded.arch.max_position_embeddings} positions"
        )
    tokenizer = load_tokenizer(loaded.model_dir)
    windows = token_windows(tokenizer, texts, args.num_samples, args.seq_len)
    calibration = CalibrationConfig(
        dataset=Path(args.calib_data).name, num_samples=len(windows.token_ids), seq_len=windows.token_ids.shape[1]
    )
    quant = QuantConfig(
        level=args.level, alpha=alpha, weight_granularity=args.weight_granularity, calibration=calibration
    )
    started = time.perf_counter()
    stats = calibrate(loaded.model, windows.token_ids) if quant.needs_calibration else None
    smoothquant(loaded.model, quant, stats)
    out = save_w8a8(loaded.model, quant, args.out, loaded.model_dir)
    recipe = f"alpha={alpha}" if alpha is not None else "naive (no smoothing)"
    print(
        f"wrote W8A8 {quant.level} {recipe}, {quant.weight_granularity} weights, calibrated on "
        f"{calibration.num_samples} x {calibration.seq_len} tokens of {calibration.dataset}: {out} "
        f"({_dir_size_gb(out):.3f} GB, {time.perf_counter() - started:.1f} s)"
    )
    return 0


# --------------------------------------------------------------------------------------------------
# eval


def cmd_eval(args: argparse.Namespace) -> int:
    from engine.eval import command

    return command.run(args)


# --------------------------------------------------------------------------------------------------
# bench


def cmd_bench(args: argparse.Namespace) -> int:
    from engine.bench import command

    return command.run(args)


# --------------------------------------------------------------------------------------------------
# serve


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig, ServerConfig
    from server.main import api_key_from_env, serve

    config = EngineConfig(
        model=ModelConfig(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                          quantization=args.quantization, quant=QuantConfig(level=args.level),
                          max_model_len=args.max_model_len, load_format=args.load_format,
                          enforce_eager=args.enforce_eager),
        cache=CacheConfig(block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                          num_cpu_blocks=args.num_cpu_blocks, enable_prefix_caching=not args.no_prefix_caching,
                          kv_cache_dtype=args.kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs),
        parallel=ParallelConfig(tensor_parallel_size=args.tensor_parallel_size),
        server=ServerConfig(host=args.host, port=args.port, api_key=api_key_from_env(args.api_key),
                            served_model_name=args.served_model_name, max_queued_requests=args.max_queued_requests,
                            max_queued_tokens=args.max_queued_tokens, metrics_public=args.metrics_public,
                            shutdown_timeout_s=args.shutdown_timeout),
    )  # fmt: skip
    return serve(config)


# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoothserve", description="SmoothQuant W8A8 inference for OPT models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = commands.add_parser("make-tiny-model", help="write a random (optionally trained) OPT model, offline")
    tiny.add_argument("dir", help="output directory")
    tiny.add_argument("--shape", default="tiny", help="tiny, tiny-post-ln, opt-125m ... opt-175b (default: tiny)")
    for flag in (
        "--hidden-size",
        "--num-layers",
        "--num-heads",
        "--ffn-dim",
        "--max-positions",
        "--word-embed-proj-dim",
        "--vocab-size",
    ):
        tiny.add_argument(flag, type=int, help="override the shape's value")
    tiny.add_argument("--post-ln", action="store_true", help="normalize after each block, like OPT-350m")
    tiny.add_argument("--tokenizer-vocab-size", type=int, default=2048, help="BPE vocabulary (default 2048)")
    tiny.add_argument("--train-steps", type=int, default=0, help="CPU training steps on the corpus (default 0)")
    tiny.add_argument("--outliers", action="store_true", help="plant function-preserving outlier channels")
    tiny.add_argument("--outlier-channels", type=int, help="how many outlier channels (default hidden/32, 2..8)")
    tiny.add_argument("--corpus", help="text file to train on (default: the shipped Shakespeare corpus)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    tiny.set_defaults(func=cmd_make_tiny_model)

    quantize = commands.add_parser("quantize", help="calibrate, smooth and quantize an FP16 model to W8A8")
    quantize.add_argument("--model", required=True, help="FP16 model directory or hub name")
    quantize.add_argument("--calib-data", required=True, help="calibration text: .jsonl with a text field, or text")
    quantize.add_argument("--out", required=True, help="output directory for the W8A8 checkpoint")
    smoothing = quantize.add_mutually_exclusive_group()
    smoothing.add_argument("--alpha", type=float, default=0.5, help="migration strength (default 0.5, as for OPT)")
    smoothing.add_argument("--no-smooth", action="store_true", help="naive W8A8: quantize without smoothing")
    quantize.add_argument(
        "--level",
        choices=("O1", "O2", "O3"),
        default="O1",
        help="O1 per-token dynamic, O2 per-tensor dynamic, O3 per-tensor static activations",
    )
    quantize.add_argument("--weight-granularity", choices=("per_channel", "per_tensor"), default="per_channel")
    quantize.add_argument("--num-samples", type=int, default=128, help="calibration sequences (default 128)")
    quantize.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    quantize.add_argument("--device", default="auto")
    quantize.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto")
    quantize.set_defaults(func=cmd_quantize)

    serve_parser = commands.add_parser("serve", help="serve OpenAI-style completions over HTTP")
    serve_parser.add_argument("--model", required=True, help="model directory (FP16 or W8A8) or hub name")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument("--api-key", help="require this key (also SMOOTHSERVE_API_KEY)")
    serve_parser.add_argument("--served-model-name", help="the name clients use (default: the directory name)")
    serve_parser.add_argument("--quantization", choices=("w8a8",), help="quantize an FP16 checkpoint in memory")
    serve_parser.add_argument("--level", choices=("O1", "O2", "O3"), default="O1", help="for --quantization w8a8")
    serve_parser.add_argument("--max-model-len", type=int)
    serve_parser.add_argument("--block-size", type=int, default=16)
    serve_parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve_parser.add_argument("--num-cpu-blocks", type=int, help="KV cache blocks when running on the CPU")
    serve_parser.add_argument("--no-prefix-caching", action="store_true")
    serve_parser.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="auto",
        help="int8: keys and values quantized per (token, head); twice the tokens per GiB",
    )
    serve_parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    serve_parser.add_argument("--max-num-seqs", type=int, default=256)
    serve_parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=1024,
        help="admitted, unfinished requests before new ones get 429 (default 1024)",
    )
    serve_parser.add_argument(
        "--max-queued-tokens",
        type=int,
        help="prompt tokens of admitted, unfinished requests before new ones get 429 (default: no limit)",
    )
    serve_parser.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    serve_parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests may run on (default 30)",
    )
    serve_parser.add_argument("--device", default="auto")
    serve_parser.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto")
    serve_parser.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="split the model over this many GPUs (one process each)"
    )
    serve_parser.add_argument(
        "--load-format",
        choices=("auto", "random"),
        default="auto",
        help="random: no checkpoint, random weights (W8A8 with --quantization w8a8) for benchmarking; "
        "--model may then be random:<shape>, e.g. random:opt-175b, with --tokenizer",
    )
    serve_parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    serve_parser.add_argument(
        "--enforce-eager", action="store_true", help="run every step eagerly (no CUDA graphs for decode steps)"
    )
    serve_parser.set_defaults(func=cmd_serve)

    evaluate = commands.add_parser("eval", help="evaluate models (FP16, W8A8, or variants compared) on a task")
    from engine.eval.command import add_arguments as add_eval_arguments

    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    bench = commands.add_parser("bench", help="load a running server and measure latency and throughput")
    from engine.bench.command import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except SmoothServeError as error:
        print(f"smoothserve: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("smoothserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
