"""The plan's one pass: LRU and Belady MIN stack distances at every cache size, compiled (numba,
plan/curves.py) against the plain reference versions, in the same run, on random routing shaped
like Mixtral-8x7B's (32 layers x 8 experts, top-2) and Qwen3-30B-A3B's (48 x 128, top-8).

    python3 benchmarks/bench_curves.py
"""

from __future__ import annotations

import os
import time

import numpy as np

from finemoe.plan import curves

SHAPES = (("Mixtral-8x7B 32x8 top-2, 600 tokens", 32, 8, 2, 600), ("Qwen3-30B-A3B 48x128 top-8, 156 tokens", 48, 128, 8, 156))


def best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    curves.lru_distances(np.arange(5))  # numba compiles (or loads its cache) outside the timings
    curves.min_distances(np.arange(5))
    print(f"load average {os.getloadavg()[0]:.1f}; best of 3 runs each")
    rng = np.random.default_rng(0)
    for name, L, J, K, T in SHAPES:
        keys = (np.arange(L)[None, :, None] * J + rng.integers(0, J, (T, L, K))).ravel()
        belady = -curves.next_uses(keys)
        for label, fast, plain in (
            ("LRU", lambda k=keys: curves.lru_distances(k), lambda k=keys: curves.lru_distances_plain(k)),
            ("MIN", lambda k=keys, b=belady: curves.priority_distances(k, b),
             lambda k=keys, b=belady: curves.priority_distances_plain(k, b)),
        ):
            tf, tp = best_of(fast), best_of(plain)
            print(f"{name}, {label}, {len(keys):,} accesses: compiled {tf * 1000:.1f} ms, plain {tp * 1000:.1f} ms, "
                  f"{tp / tf:.0f}x")


if __name__ == "__main__":
    main()
