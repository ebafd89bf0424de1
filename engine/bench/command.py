"""`smoothserve bench`: its arguments and what it does with them.

    smoothserve bench --url http://localhost:8000 --dataset random --input-len 512 --output-len 128 \
        --request-rate 1,4,16,inf --out results/
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from engine.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    parser.add_argument("--model", help="model name to ask for (default: the one the server lists)")
    parser.add_argument("--api-key", help="the server's API key (also SMOOTHSERVE_API_KEY)")
    parser.add_argument("--dataset", default="random",
                        help="random (corpus windows of --input-len tokens), or a prompt file: text, one prompt "
                             "per line, or .jsonl with a prompt or text field. The warm-up and each rate send "
                             "prompts of their own (a file is read on), so no rate finds another's in the "
                             "server's prefix cache")  # fmt: skip
    parser.add_argument("--num-prompts", type=int, default=100, help="requests per request rate (default 100)")
    parser.add_argument("--input-len", type=int, help="prompt tokens (default 512 for random; file: as written)")
    parser.add_argument("--output-len", type=int, default=128, help="generated tokens per request, ignoring EOS")
    parser.add_argument("--request-rate", default="inf", help="requests/s, comma-separated; inf sends all at once")
    parser.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson", help="gaps between sends")
    parser.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    parser.add_argument("--num-warmups", type=int, default=2, help="unmeasured requests first (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seeds prompts and arrivals (default 0)")
    parser.add_argument("--slo-ttft-ms", type=float, help="goodput: time to first token at most this")
    parser.add_argument("--slo-tpot-ms", type=float, help="goodput: time per output token at most this")
    parser.add_argument("--slo-e2e-ms", type=float, help="goodput: end-to-end latency at most this")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    parser.add_argument("--out", help="directory for bench.json and the PNG plots")
    parser.add_argument("--no-plots", action="store_true", help="write the JSON only")
    parser.add_argument("--server-metrics", action="store_true",
                        help="save the server's Prometheus /metrics before and after each rate's load "
                             "(metrics-RATE-before.txt, metrics-RATE-after.txt in --out)")  # fmt: skip


def _config(args: argparse.Namespace):
    from engine.bench.arrivals import parse_rates
    from engine.bench.metrics import SLO
    from engine.bench.runner import BenchConfig

    for name in ("num_prompts", "output_len", "max_concurrency", "input_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.num_warmups < 0:
        raise ConfigError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    try:
        rates = tuple(parse_rates(args.request_rate))
    except ValueError as error:
        raise ConfigError(f"--request-rate: {error}") from None
    input_len = args.input_len or (512 if args.dataset == "random" else None)
    return BenchConfig(
        url=args.url.rstrip("/"), dataset=args.dataset, num_prompts=args.num_prompts, input_len=input_len,
        output_len=args.output_len, request_rates=rates, arrivals=args.arrivals, max_concurrency=args.max_concurrency,
        num_warmups=args.num_warmups, seed=args.seed, slo=SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms),
        model=args.model, api_key=args.api_key or os.environ.get("SMOOTHSERVE_API_KEY"), timeout_s=args.timeout,
        server_metrics=args.server_metrics,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from engine.bench.plots import MISSING_MATPLOTLIB, draw_plots, matplotlib_available
    from engine.bench.report import format_load, rate_label, write_json
    from engine.bench.runner import run_benchmark
    from engine.table import align_columns

    config = _config(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    if args.dataset != "random" and not Path(args.dataset).is_file():
        raise ConfigError(f"--dataset is neither random nor a file: {args.dataset}")
    result = run_benchmark(config)
    print(f"{result.model} at {config.url}: {config.num_prompts} requests per rate, "
          f"{config.input_len or 'file'} prompt tokens -> {config.output_len} output tokens")  # fmt: skip
    for load in result.loads:
        print()
        print(format_load(load.summary, config))
    print()
    header = ["rate (req/s)", "sent", "failed", "req/s", "out tok/s", "goodput", "TTFT p99 ms", "TPOT p99 ms"]
    rows = [[rate_label(s.request_rate), str(s.num_requests), str(s.failed), f"{s.request_throughput:.2f}",
             f"{s.output_token_throughput:.1f}", "-" if s.goodput is None else f"{s.goodput:.2f}",
             f"{s.ttft_ms.get('p99', float('nan')):.1f}", f"{s.tpot_ms.get('p99', float('nan')):.1f}"]
            for s in (load.summary for load in result.loads)]  # fmt: skip
    print("\n".join(align_columns([header, *rows])))
    if args.out:
        out = Path(args.out)
        print(f"wrote {write_json(result, config, out)}")
        for load in result.loads:
            if load.metrics_before is not None and load.metrics_after is not None:
                for when, text in (("before", load.metrics_before), ("after", load.metrics_after)):
                    path = out / f"metrics-{rate_label(load.summary.request_rate)}-{when}.txt"
                    path.write_text(text)
                    print(f"wrote {path}")
        if args.no_plots:
            pass
        elif matplotlib_available():
            for path in draw_plots(result, out):
                print(f"wrote {path}")
        else:
            print(MISSING_MATPLOTLIB)
    return 0
