"""Where one engine step spends its GPU time: the kernels of a decode step (and of a prefill), by total
CUDA time, and the host operations by self CPU time, from torch.profiler. A tool for finding what to
speed up, not a benchmark of record.

    python -m benchmarks.profile_step --model opt-30b --variant w8a8-O3 --batch 1 --prefill 128
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.latency import BLOCK_SIZE, Settings, _step, architecture, build_model, kv_cache_dtype
from engine.config import CacheConfig, SchedulerConfig
from engine.model_runner import ModelRunner, determine_num_blocks, profile_activation_bytes
from engine.sampling import SamplingParams, SamplingRow, sample


def kernel_table(fn, steps: int, rows: int, trace: str | None = None) -> str:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    if trace:
        prof.export_chrome_trace(trace)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    lines = [f"GPU time per step: {total / steps / 1e3:.3f} ms over {sum(e.count for e in events) // steps} kernels",
             f"{'us/step':>9} {'calls':>6} {'us/call':>8}  kernel"]  # fmt: skip
    for e in events[:rows]:
        lines.append(f"{e.device_time_total / steps:9.1f} {e.count // steps:6d} {e.device_time_total / e.count:8.2f}"
                     f"  {e.key[:110]}")  # fmt: skip
    # The host side: where the CPU spends a step (CUDA runtime calls included, so a copy or sync that waits
    # for the GPU shows up), for when wall time per step exceeds GPU time.
    host = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    host.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    lines += [f"Host time per step: {sum(e.self_cpu_time_total for e in host) / steps / 1e3:.3f} ms (self CPU time)",
              f"{'us/step':>9} {'calls':>6}  host op"]  # fmt: skip
    lines += [f"{e.self_cpu_time_total / steps:9.1f} {e.count // steps:6d}  {e.key[:110]}" for e in host[:rows]]
    return "\n".join(lines)


def wall_ms(fn, steps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):  # the first calls pay one-time costs (the sampler's first kernels, allocations)
        fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def host_ms(fn, steps: int) -> float:
    """Wall time per call measured on the host, synchronizing after each call (a step as the engine runs it)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-30b")
    parser.add_argument("--variant", default="w8a8-O3")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=0, help="also profile a prefill of this many tokens")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--trace", help="write the profiled decode steps as a Chrome trace to this file")
    parser.add_argument("--breakdown", action="store_true", help="host-timed parts of a decode step: flattening, "
                        "the forward alone, with the logits, with sampling")  # fmt: skip
    parser.add_argument("--sample", action="store_true", help="include greedy sampling of the step's logits, "
                        "as a server's step does")  # fmt: skip
    parser.add_argument("--no-pdl", action="store_true", help="launch without programmatic dependent launch "
                        "(SMOOTHSERVE_PDL=0), to time what it saves")  # fmt: skip
    args = parser.parse_args()
    if args.no_pdl:
        os.environ["SMOOTHSERVE_PDL"] = "0"  # read by the extension at its first launch, which comes later
    device = torch.device("cuda")
    settings = Settings(device, torch.float16, (max(args.prefill, 1),), (args.batch,), args.context, 1, 0.9)
    arch = architecture(args.model)
    model = build_model(arch, args.variant, settings)
    scheduler = SchedulerConfig(max_num_batched_tokens=max(args.prefill, 512), max_num_seqs=max(args.batch, 1))
    cache = CacheConfig(
        block_size=BLOCK_SIZE, gpu_memory_utilization=0.9, num_cpu_blocks=1, kv_cache_dtype=kv_cache_dtype(args.variant)
    )
    activation = profile_activation_bytes(model, scheduler, arch.max_position_embeddings)
    num_blocks = determine_num_blocks(model, cache, device, torch.float16, activation)
    runner = ModelRunner(model, cache, num_blocks, device, torch.float16, max_model_len=arch.max_position_embeddings,
                         max_num_seqs=args.batch, enforce_eager=args.eager)  # fmt: skip
    decode, sequences = _step([(args.context, 1)] * args.batch)
    greedy = SamplingParams(temperature=0.0, ignore_eos=True)
    rows = [SamplingRow(greedy, [], [], None, None) for _ in range(args.batch)]  # every sequence samples

    def run_decode():
        output = runner.execute(decode, sequences)
        if args.sample:
            sample(output.logits, rows)

    pdl = " (no PDL)" if args.no_pdl else ""
    print(f"== {args.model} {args.variant}{pdl} decode batch {args.batch} context {args.context}: "
          f"{wall_ms(run_decode, args.steps):.3f} ms/step wall")  # fmt: skip
    if args.breakdown:
        batch = runner._flatten(decode, sequences)
        parts = {
            "flatten (host)": lambda: runner._flatten(decode, sequences),
            "forward": (lambda: runner.graphs.run(batch)) if runner.graphs else (lambda: runner.run(batch)),
            "forward + logits": lambda: runner.run(batch),
            "execute": lambda: runner.execute(decode, sequences),
            "execute + sample": lambda: sample(runner.execute(decode, sequences).logits, rows),
        }
        for name, fn in parts.items():
            print(f"  {name:<18} {host_ms(fn, args.steps):8.3f} ms (host-timed, synchronized)")
    print(kernel_table(run_decode, args.steps, args.rows, args.trace))
    if args.prefill:
        prefill, prefill_seqs = _step([(0, args.prefill)])
        run_prefill = lambda: runner.execute(prefill, prefill_seqs)  # noqa: E731
        print(f"== prefill {args.prefill}: {wall_ms(run_prefill, args.steps):.3f} ms/step wall")
        print(kernel_table(run_prefill, args.steps, args.rows))


if __name__ == "__main__":
    main()
