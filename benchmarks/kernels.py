"""Kernel benchmark: our W8A8 GEMM (with its fused epilogue) against cuBLAS FP16 and cuBLASLt INT8,
and the bandwidth of the quantize kernels, on OPT layer shapes.

    python -m benchmarks.kernels --out benchmarks/results

Writes kernels-<device>.json and kernels-<device>.md (device, date, commit) and prints the table and
the target checks (pass/fail per row group). Timing: each op is captured GRAPH_CALLS times in a CUDA
graph (so host launch overhead is not counted, as in graph-captured decoding); the graph is replayed
--reps times and the median replay time divided by GRAPH_CALLS is reported. Weights rotate over enough
copies to exceed the L2 cache, so every call streams them from HBM.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from benchmarks.common import copy_bandwidth_gbs, provenance, targets_table, write_report
from engine import ops

MODELS = {"opt-13b": 5120, "opt-30b": 7168, "opt-66b": 9216, "opt-175b": 12288}
M_VALUES = [1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
L2_FLUSH_BYTES = 256 * 1024**2
GRAPH_CALLS = 16


def layer_shapes(hidden: int) -> dict[str, tuple[int, int]]:
    """(N, K) per layer: qkv fused 3h x h, out_proj h x h, fc1 4h x h, fc2 h x 4h."""
    return {
        "qkv": (3 * hidden, hidden),
        "out": (hidden, hidden),
        "fc1": (4 * hidden, hidden),
        "fc2": (hidden, 4 * hidden),
    }


def time_ms(fn: Callable[[int], object], reps: int, copies: int) -> float:
    """GPU time of one fn(i) call, i cycling over the weight copies."""
    for i in range(copies):  # warm-up; allocations outside the capture
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(GRAPH_CALLS):
            fn(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / GRAPH_CALLS)
    return statistics.median(times)


def bench_gemm(m: int, n: int, k: int, reps: int) -> dict[str, float | None]:
    weight_bytes = n * k
    copies = max(1, min(8, -(-L2_FLUSH_BYTES // weight_bytes)))
    w8 = [torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda") for _ in range(copies)]
    w16 = [torch.randn(k, n, dtype=torch.float16, device="cuda") for _ in range(copies)]  # [K, N] for mm
    a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    a16 = torch.randn(m, k, dtype=torch.float16, device="cuda")
    a_scale = torch.rand(m, device="cuda") * 1e-3
    w_scale = torch.rand(n, device="cuda") * 1e-3
    bias = torch.randn(n, dtype=torch.float16, device="cuda")

    ours = time_ms(lambda i: ops.w8a8_gemm(a8, w8[i], a_scale, w_scale, bias, out_dtype=torch.float16), reps, copies)
    fp16 = time_ms(lambda i: torch.mm(a16, w16[i]), reps, copies)
    int_mm = None
    if m > 16:  # torch._int_mm needs M > 16; its dequantization is a separate elementwise pass
        w8t = [w.t() for w in w8]

        def int_mm_dequant(i: int) -> torch.Tensor:
            acc = torch._int_mm(a8, w8t[i])
            return (acc * a_scale[:, None] * w_scale[None, :] + bias).to(torch.float16)

        int_mm = time_ms(int_mm_dequant, reps, copies)
    return {"ours_ms": ours, "fp16_ms": fp16, "int_mm_dequant_ms": int_mm}


def bench_quantize(m: int, k: int, reps: int) -> dict[str, float]:
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    weight = torch.randn(k, dtype=torch.float16, device="cuda")
    bias = torch.randn(k, dtype=torch.float16, device="cuda")
    moved = m * k * 3 + m * 4  # fp16 in, int8 out, float scales
    per_token = time_ms(lambda _: torch.ops.smoothserve.quantize_per_token(x), reps, 1)
    ln_quant = time_ms(
        lambda _: torch.ops.smoothserve.layernorm_quant(x, weight, bias, 1e-5, "per_token", None), reps, 1
    )
    return {"quantize_per_token_gbs": moved / per_token / 1e6, "layernorm_quant_gbs": moved / ln_quant / 1e6}


def evaluate_targets(rows: list[dict], quant_rows: list[dict], copy_gbs: float) -> list[dict]:
    large = [r["speedup_vs_fp16"] for r in rows if r["m"] >= 512]
    small = [r["speedup_vs_fp16"] for r in rows if r["m"] <= 64]
    int_mm = [r for r in rows if r["speedup_vs_int_mm"] is not None]
    slowest_vs_int_mm = min(int_mm, key=lambda r: r["speedup_vs_int_mm"]) if int_mm else None
    quant_at_8192 = [q for q in quant_rows if q["m"] == 8192]
    worst_quant = min(min(q["quantize_per_token_gbs"], q["layernorm_quant_gbs"]) for q in quant_at_8192)
    return [
        {"target": "M >= 512: median speedup over FP16 >= 1.6x", "value": statistics.median(large),
         "pass": statistics.median(large) >= 1.6},
        {"target": "M >= 512: every speedup over FP16 >= 1.3x", "value": min(large), "pass": min(large) >= 1.3},
        {"target": "M <= 64: every speedup over FP16 >= 1.8x", "value": min(small), "pass": min(small) >= 1.8},
        {"target": "every shape (M > 16): faster than torch._int_mm + dequant",
         "value": slowest_vs_int_mm["speedup_vs_int_mm"] if slowest_vs_int_mm else None,
         "pass": bool(slowest_vs_int_mm) and slowest_vs_int_mm["speedup_vs_int_mm"] > 1.0},
        {"target": "quantize / LayerNorm-quantize at M = 8192 >= 75% of copy bandwidth",
         "value": worst_quant / copy_gbs, "pass": worst_quant >= 0.75 * copy_gbs},
    ]  # fmt: skip


def to_markdown(report: dict) -> str:
    lines = [
        f"# Kernel benchmark: {report['device']}",
        "",
        f"Date {report['date']}, commit {report['commit']}, torch {report['torch']}, CUDA {report['cuda']}. "
        f"Copy bandwidth {report['copy_bandwidth_gbs']:.0f} GB/s. CUDA-graph timing: median of {report['reps']} "
        f"replays of {GRAPH_CALLS} calls each.",
        "",
        *targets_table(report["targets"]),
    ]
    lines += ["", "## W8A8 GEMM (fp16 output, per-token x per-channel scales, bias)", "",
              "| model | layer | M | N | K | ours ms | TOPS | fp16 ms | ×fp16 | int_mm+dq ms | ×int_mm |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["gemm"]:
        int_mm = "n/a" if r["int_mm_dequant_ms"] is None else f"{r['int_mm_dequant_ms']:.4f}"
        vs_int_mm = "n/a" if r["speedup_vs_int_mm"] is None else f"{r['speedup_vs_int_mm']:.2f}"
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['m']} | {r['n']} | {r['k']} | {r['ours_ms']:.4f} | {r['tops']:.0f} | "
            f"{r['fp16_ms']:.4f} | {r['speedup_vs_fp16']:.2f} | {int_mm} | {vs_int_mm} |"
        )
    lines += ["", "## Quantize kernels (fp16 in, int8 out)", "",
              "| M | K | quantize_per_token GB/s | layernorm_quant GB/s |", "|---|---|---|---|"]  # fmt: skip
    for q in report["quantize"]:
        lines.append(f"| {q['m']} | {q['k']} | {q['quantize_per_token_gbs']:.0f} | {q['layernorm_quant_gbs']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--m", default=",".join(map(str, M_VALUES)))
    args = parser.parse_args()
    assert torch.cuda.is_available() and ops.EXTENSION_LOADED, "needs a GPU and the built extension"

    rows = []
    for model in args.models.split(","):
        for layer, (n, k) in layer_shapes(MODELS[model]).items():
            for m in map(int, args.m.split(",")):
                timing = bench_gemm(m, n, k, args.reps)
                tops = 2 * m * n * k / timing["ours_ms"] / 1e9
                int_mm = timing["int_mm_dequant_ms"]
                rows.append({"model": model, "layer": layer, "m": m, "n": n, "k": k, **timing, "tops": tops,
                             "speedup_vs_fp16": timing["fp16_ms"] / timing["ours_ms"],
                             "speedup_vs_int_mm": None if int_mm is None else int_mm / timing["ours_ms"]})  # fmt: skip
                print(f"{model} {layer} M={m}: ours {timing['ours_ms']:.4f} ms, fp16 {timing['fp16_ms']:.4f} ms",
                      flush=True)  # fmt: skip
    quant_rows = [{"m": m, "k": k, **bench_quantize(m, k, args.reps)} for k in (5120, 7168, 9216, 12288)
                  for m in (1, 64, 1024, 8192)]  # fmt: skip
    copy_gbs = copy_bandwidth_gbs(args.reps)
    report = {
        **provenance(torch.device("cuda")),
        "reps": args.reps,
        "copy_bandwidth_gbs": copy_gbs,
        "gemm": rows,
        "quantize": quant_rows,
        "targets": evaluate_targets(rows, quant_rows, copy_gbs),
    }
    markdown = to_markdown(report)
    write_report(args.out, "kernels", report, markdown)
    print(markdown[: markdown.index("## W8A8 GEMM")])


if __name__ == "__main__":
    main()
