"""How fast is the repeated n-gram detector, next to the rest of the data path?

    python -m benchmarks.ngram_detector [--threads 1] [--reps 20]

Prints one row per batch shape: the detector's throughput (periods 1-13, 32 repeats, as OLMo 2)
on CPU, on CUDA when there is one, and the time to draw the same batch from the synthetic
source, so the detector's share of a train step's data cost is plain.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch

from proxy.config import DataConfig
from proxy.data import build_source, find_repeated_ngrams

SHAPES = [(16, 129), (64, 513), (256, 1025), (32, 4097)]


def median_seconds(fn: Callable[[], object], reps: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def with_runs(rows: int, length: int, seed: int = 0) -> np.ndarray:
    """Random tokens with a planted run in every fourth row (work the detector cannot skip)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50_000, (rows, length))
    for r in range(0, rows, 4):
        period = int(rng.integers(1, 5))
        if 32 * period <= length:
            start = int(rng.integers(0, length - 32 * period + 1))
            tokens[r, start : start + 32 * period] = np.tile(rng.integers(0, 50_000, period), 32)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = build_source(DataConfig())
    cuda = torch.cuda.is_available()

    header = f"{'batch x len':>12} {'cpu Mtok/s':>11} {'cpu ms':>8}"
    header += f" {'cuda Mtok/s':>12} {'cuda ms':>8}" if cuda else ""
    header += f" {'synthetic batch ms':>19} {'detector share':>15}"
    print(f"find_repeated_ngrams, periods 1-13, min_repeats 32, torch threads {args.threads}")
    print(header)
    for rows, length in SHAPES:
        tokens = with_runs(rows, length)
        cpu = median_seconds(lambda tokens=tokens: find_repeated_ngrams(tokens), args.reps)
        line = f"{rows:>5} x {length:<5} {rows * length / cpu / 1e6:>11.1f} {cpu * 1e3:>8.2f}"
        if cuda:
            on_gpu = torch.from_numpy(tokens).cuda()
            gpu = median_seconds(lambda on_gpu=on_gpu: find_repeated_ngrams(on_gpu), args.reps, torch.cuda.synchronize)
            line += f" {rows * length / gpu / 1e6:>12.1f} {gpu * 1e3:>8.2f}"
        draw = median_seconds(
            lambda rows=rows, length=length: source.batch("train", 0, rows, length - 1), max(3, args.reps // 4)
        )
        line += f" {draw * 1e3:>19.1f} {cpu / (cpu + draw):>14.0%}"
        print(line)


if __name__ == "__main__":
    main()
