"""How long FineMoE's expert map search takes in our implementation (the figure behind SEARCH_S_DEFAULT).

Per layer of a one-token decode step: the incremental trajectory match (cosine of the rows seen so
far against C stored maps), the argmax and the delta selection. Baseline measured in the same run:
the naive search that recomputes the full prefix cosine at every layer. Also: semantic match and
store insertion (redundancy replacement). Quick by default; `--capacity`, `--layers`, `--experts`.

    python3 benchmarks/bench_map_search.py
    python3 benchmarks/bench_map_search.py --layers 24 --experts 60 --top-k 4   # Qwen1.5-MoE
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from finemoe.policies.expert_maps import ExpertMapStore, cosine_rows, select_by_delta


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacity", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--semantic-dim", type=int, default=256)
    ap.add_argument("--distance", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    L, J, C = args.layers, args.experts, args.capacity
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

    def incremental() -> None:  # one decode step, every layer: what the policy does
        q = store.trajectory(1)
        for layer in range(L - args.distance):
            cos = q.observe(layer, query[layer : layer + 1])
            m = q.best(cos)[0]
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
    print(f"store memory: {store.nbytes / 1e6:.1f} MB; filling {C} maps took {fill_s * 1e3:.1f} ms")
    print(f"trajectory search per layer (incremental, ours): {inc_s * 1e6:8.1f} us")
    print(f"trajectory search per layer (naive recompute):   {naive_s * 1e6:8.1f} us   ratio naive/ours {naive_s / inc_s:.2f}x")
    print(f"semantic search per step:                        {sem_s * 1e6:8.1f} us")
    print(f"insertion into a full store (redundancy):        {insert_s * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
