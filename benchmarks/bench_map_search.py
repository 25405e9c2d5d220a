"""How long FineMoE's expert map search takes in our implementation (the figures the policy's
`search_s` and `search_token_s` defaults were set from; docs/policies.md has both).

Two levels, both with a full store of C maps:
* the policy's own calls (what the simulator charges): `on_layer_routed` of a one-token decode step
  (per searched layer: observing the rows, the incremental trajectory match, the argmax, the delta
  selection and the prefetch list), and of a `--prefill-tokens`-token prefill, whose extra cost per
  token beyond the first is `search_token_s`;
* the store alone: the incremental match per layer against the naive search that recomputes the
  full prefix cosine at every layer (the baseline, measured in the same run), semantic match and
  insertion (redundancy replacement).

    python3 benchmarks/bench_map_search.py
    python3 benchmarks/bench_map_search.py --layers 24 --experts 60 --top-k 4   # Qwen1.5-MoE
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from finemoe.policies.base import LayerRouting, PolicyContext, Sequence, StepInfo
from finemoe.policies.expert_maps import ExpertMapStore, cosine_rows, select_by_delta
from finemoe.policies.registry import make_policy
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def policy_call_times(args) -> tuple[float, float]:
    """(one decode token, one prefill of n tokens): median seconds per searched layer of the
    policy's `on_layer_routed`, store filled with C maps from a synthetic history."""
    g = tiny_geometry(num_layers=args.layers, num_experts=args.experts, top_k=args.top_k)
    n = args.prefill_tokens
    history = synthetic_trace(g, num_requests=max(1, args.capacity // 64), prompt_tokens=1, generated_tokens=64,
                              semantic_dim=args.semantic_dim, with_spec=False, seed=1)
    measured = synthetic_trace(g, num_requests=1, prompt_tokens=n, generated_tokens=1,
                               semantic_dim=args.semantic_dim, with_spec=False, seed=2)
    policy = make_policy("finemoe", distance=args.distance, capacity=args.capacity)
    policy.bind(PolicyContext(g, g.num_layers * g.num_experts, 0, lambda k: False, lambda k: False, 1e-3))
    policy.fit(history)
    searched = range(args.layers - args.distance)

    def step(start: int, stop: int, iteration: int) -> None:
        info = StepInfo(0, 0.0, (Sequence(0, iteration, start, stop),), measured)
        policy.on_step_start(info)
        for layer in searched:
            policy.on_layer_routed(LayerRouting(info, layer, 0.0, measured))

    decode_s = median_time(lambda: step(n, n + 1, 1), args.repeats) / len(searched)
    prefill_s = median_time(lambda: step(0, n, 0), max(3, args.repeats // 10)) / len(searched)
    return decode_s, prefill_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacity", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--semantic-dim", type=int, default=256)
    ap.add_argument("--distance", type=int, default=3)
    ap.add_argument("--prefill-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    L, J, C, n = args.layers, args.experts, args.capacity, args.prefill_tokens
    decode_s, prefill_s = policy_call_times(args)
    token_s = (prefill_s - decode_s) / (n - 1)

    rng = np.random.default_rng(0)
    maps = rng.dirichlet(np.full(J, 0.3), size=(C, L)).astype(np.float32)
    keys = rng.normal(size=(C, args.semantic_dim)).astype(np.float32)
    store = ExpertMapStore(L, J, C, args.distance, args.semantic_dim)
    t0 = time.perf_counter()
    for m, k in zip(maps, keys, strict=True):
        store.add(m, k)
    fill_s = time.perf_counter() - t0
    query = rng.dirichlet(np.full(J, 0.3), size=L).astype(np.float32)
    qkey = rng.normal(size=args.semantic_dim).astype(np.float32)

    def incremental() -> None:  # one decode step, every layer, store only
        q = store.trajectory(1)
        for layer in range(L - args.distance):
            m = q.best(q.observe(layer, query[layer : layer + 1]))[0]
            select_by_delta(store.maps[m.index, layer + args.distance], m.similarity, args.top_k)

    flat = store.maps.reshape(C, L * J)

    def naive() -> None:  # recompute the prefix cosine from scratch at every layer
        for layer in range(L - args.distance):
            width = (layer + 1) * J
            cos = cosine_rows(flat[:, :width], query[: layer + 1].reshape(-1))
            i = int(np.argmax(cos))
            select_by_delta(store.maps[i, layer + args.distance], float(cos[i]), args.top_k)

    layers = L - args.distance
    inc_s = median_time(incremental, args.repeats) / layers
    naive_s = median_time(naive, args.repeats) / layers
    sem_s = median_time(lambda: store.match_semantic(qkey), args.repeats * 10)
    extra = rng.dirichlet(np.full(J, 0.3), size=(200, L)).astype(np.float32)
    t0 = time.perf_counter()
    for m in extra:
        store.add(m, qkey)
    insert_s = (time.perf_counter() - t0) / len(extra)
    print(f"geometry: {L} layers x {J} experts, top-{args.top_k}, C={C} maps, semantic dim {args.semantic_dim}")
    print(f"policy call per searched layer, 1-token decode:   {decode_s * 1e6:8.1f} us   (search_s)")
    print(f"policy call per searched layer, {n}-token prefill: {prefill_s * 1e6:8.1f} us   "
          f"each token after the first {token_s * 1e6:.2f} us (search_token_s)")
    print(f"store: filling {C} maps took {fill_s * 1e3:.1f} ms, {store.nbytes / 1e6:.1f} MB")
    print(f"store: trajectory match per layer (incremental): {inc_s * 1e6:8.1f} us")
    print(f"store: trajectory match per layer (naive):       {naive_s * 1e6:8.1f} us   "
          f"ratio naive/incremental {naive_s / inc_s:.2f}x")
    print(f"store: semantic match per step:                  {sem_s * 1e6:8.1f} us")
    print(f"store: insertion into a full store (redundancy): {insert_s * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
