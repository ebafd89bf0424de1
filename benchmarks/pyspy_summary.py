"""Summarize a py-spy raw recording (`py-spy record -f raw --threads [--idle]`) per thread: the share
of samples each thread has and, within it, the functions most samples pass through (inclusive) and the
innermost frames they sit in (what the thread is doing: computing, or waiting on the GPU or a lock).

    python -m benchmarks.pyspy_summary serving-w8a8/pyspy.txt [--frames 15] [--match engine/,server/]

A raw file has one line per distinct stack: `thread (id): name;frame;frame;... count`, outermost first.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

LINE_NUMBER = re.compile(r":\d+\)$")


def summarize(lines: list[str], frames: int, match: tuple[str, ...] = ()) -> str:
    threads: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = {}
    innermost: dict[str, Counter[str]] = {}
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread, *calls = stack.split(";")
        samples = int(count)
        threads[thread] += samples
        functions = {LINE_NUMBER.sub(")", call) for call in calls}  # a function counts once per sample
        seen = inclusive.setdefault(thread, Counter())
        for function in functions:
            if not match or any(m in function for m in match):
                seen[function] += samples
        innermost.setdefault(thread, Counter())[calls[-1] if calls else "(no frames)"] += samples
    total = sum(threads.values())
    out = [f"{total} samples"]
    for thread, samples in threads.most_common():
        out.append(f"\n{thread}: {samples} samples ({100 * samples / total:.1f} %)")
        for function, n in inclusive[thread].most_common(frames):
            out.append(f"  {100 * n / samples:5.1f} %  {function}")
        out.append("  innermost:")
        for call, n in innermost[thread].most_common(max(3, frames // 3)):
            out.append(f"  {100 * n / samples:5.1f} %  {call}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("--frames", type=int, default=15)
    parser.add_argument("--match", default="engine/,server/,torch/cuda,asyncio,uvicorn,starlette",
                        help="comma-separated substrings; only frames holding one are listed ('' for all)")  # fmt: skip
    args = parser.parse_args(argv)
    match = tuple(m for m in args.match.split(",") if m)
    print(f"== {args.raw}")
    print(summarize(args.raw.read_text().splitlines(), args.frames, match))


if __name__ == "__main__":
    main()
