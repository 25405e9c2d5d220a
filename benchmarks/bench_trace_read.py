"""How long read_trace (with every validation) takes, against a plain pyarrow.parquet.read_table.

A synthetic trace of DeepSeek-V3-like width (default 10^5 tokens x 64 layers x top-8 of 256 experts,
random routing, no router_probs) is written once, then read N times each way; the best time counts.
Also prints bytes per token on disk, with and without router_probs (the latter on fewer tokens).

    python3 benchmarks/bench_trace_read.py            # default size
    python3 benchmarks/bench_trace_read.py --tokens 20000 --repeat 2
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finemoe.traces.geometry import Geometry  # noqa: E402
from finemoe.traces.io import read_trace, validate, write_trace  # noqa: E402
from finemoe.traces.schema import RequestInfo, Trace  # noqa: E402


def random_trace(tokens: int, layers: int, experts: int, top_k: int, *, probs: bool, seed: int = 0,
                 requests: int = 100) -> Trace:
    """Uniformly random top-k routing (distinct experts per token and layer), decode-only requests."""
    rng = np.random.default_rng(seed)
    # k distinct ids: a random start plus increasing gaps that sum to less than J, modulo J
    gaps = rng.integers(1, experts // top_k + 1, size=(tokens, layers, top_k), dtype=np.int16)
    gaps[:, :, 0] = rng.integers(0, experts, size=(tokens, layers), dtype=np.int16)
    ids = np.cumsum(gaps, axis=2, dtype=np.int16) % experts
    # descending gate weights without a sort: a running product of factors in (0.2, 1)
    w = np.cumprod(rng.uniform(0.2, 1.0, size=(tokens, layers, top_k)).astype(np.float32), axis=2)
    w /= w.sum(axis=2, keepdims=True)
    per = np.diff(np.linspace(0, tokens, requests + 1).astype(int))
    rid = np.repeat(np.arange(requests, dtype=np.int32), per)
    it = np.concatenate([np.arange(1, n + 1, dtype=np.int32) for n in per])
    router = None
    if probs:
        logits = rng.normal(size=(tokens, layers, experts)).astype(np.float32)
        router = np.exp(logits)
        router = (router / router.sum(axis=2, keepdims=True)).astype(np.float16)
    geometry = Geometry("bench-deepseek-like", layers, experts, top_k, 1, 7168, 2048, "fp8",
                        3 * 7168 * 2048, 17_000_000_000, 70_272)
    return Trace(
        geometry=geometry,
        requests=tuple(RequestInfo(r, 0, int(n), False, label=f"bench/{r}") for r, n in enumerate(per)),
        request_id=rid, iteration=it, position=it - 1,
        experts=ids.astype(np.int16), weights=w.astype(np.float16), router_probs=router,
        metadata={"source": {"kind": "benchmark", "seed": seed}},
    )


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--probs-tokens", type=int, default=2_000, help="tokens of the router_probs size check")
    ap.add_argument("--profile", action="store_true", help="print where read_trace spends its time")
    args = ap.parse_args()
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trace = random_trace(args.tokens, args.layers, args.experts, args.top_k, probs=False)
        t_gen = time.perf_counter() - t0
        path = Path(tmp) / "bench.parquet"
        t_write = best_of(lambda: write_trace(trace, path), 1)
        size = path.stat().st_size
        t_plain = best_of(lambda: pq.read_table(path), args.repeat)
        t_ours = best_of(lambda: read_trace(path), args.repeat)
        t_validate = best_of(lambda: validate(trace), args.repeat)
        print(f"trace: {args.tokens:,} tokens x {args.layers} layers x top-{args.top_k} of {args.experts} experts "
              f"(random routing; generated in {t_gen:.1f} s)")
        print(f"file: {size / 1e6:.1f} MB, {size / args.tokens:,.0f} bytes per token (experts + weights, zstd); "
              f"write {t_write:.2f} s")
        print(f"pyarrow.parquet.read_table: {t_plain:.3f} s (best of {args.repeat})")
        print(f"finemoe read_trace:         {t_ours:.3f} s (best of {args.repeat}), of which validate() "
              f"{t_validate:.3f} s")
        print(f"ratio read_trace / read_table: {t_ours / t_plain:.2f}x")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            read_trace(path)
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(15)

        if args.probs_tokens:
            small = random_trace(args.probs_tokens, args.layers, args.experts, args.top_k, probs=True, seed=1)
            p_with = Path(tmp) / "probs.parquet"
            write_trace(small, p_with)
            small.router_probs = None
            p_without = Path(tmp) / "noprobs.parquet"
            write_trace(small, p_without)
            a, b = p_with.stat().st_size / args.probs_tokens, p_without.stat().st_size / args.probs_tokens
            print(f"with router_probs ({args.layers} x {args.experts} float16, random softmax; "
                  f"{args.probs_tokens:,} tokens): {a:,.0f} bytes per token, {b:,.0f} without")


if __name__ == "__main__":
    main()
