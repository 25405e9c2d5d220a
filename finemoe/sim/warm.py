"""Every compiled kernel's machine code in this process: compiled (the first time on a machine, and
kept in numba's on-disk cache) or read from that cache, by tiny runs through each compiled path.

What a process that starts others does first (a sweep's fork server, sim/executors/preload.py; the
test suite's controller, tests/conftest.py): its children then read the cache, or, forked from it,
hold the code already, instead of each compiling the same kernels at the same time (on a fresh
install some 30 s of one core each) or reading them in their first run.
"""

from __future__ import annotations

import numpy as np

# Policies whose runs reach every compiled kernel: the cache-only path's LRU and LFU victims, and the
# prefetch kernel's planned asks, FineMoE's hooks (and its map matches) and the oracle's three kinds
# of asks (the first steps on the reference engine: its Python side's compiled helpers).
RUNS: tuple[tuple[str, dict], ...] = (
    ("lru", {}), ("lfu", {}), ("layerwise", {}), ("finemoe", {}),
    ("oracle", {"prefetch": "none"}), ("oracle", {"prefetch": "conservative"}), ("oracle", {"prefetch": "deadline"}),
)


def warm_kernels() -> dict[str, str]:
    """Run `RUNS` on a tiny synthetic trace, with their lower bounds, and the plan's hit curves;
    returns which engine path each run took (each should be "compiled"). Nothing is written
    (numba's cache aside)."""
    from finemoe.jit import numba
    from finemoe.plan.curves import lru_distances, priority_distances
    from finemoe.policies.registry import make_policy
    from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
    from finemoe.sim.hardware import PRESETS
    from finemoe.sim.run import simulate_policy
    from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

    if numba is None:
        return {}
    trace = synthetic_trace(tiny_geometry(num_layers=5, num_experts=4, top_k=2), num_requests=6,
                            prompt_tokens=(2, 4), generated_tokens=(3, 6), seed=0, semantic_dim=8)
    paths = {}
    for name, params in RUNS:
        config = SimConfig("warm-up", name, PRESETS["rtx3090"], policy_params=params,
                           memory=MemoryConfig(expert_cache_slots=8), workload=WorkloadConfig(history_fraction=0.5),
                           timeline_steps=2 if name == "oracle" else 0)  # (the oracle's Python side first)
        result = simulate_policy(trace, config, make_policy(name, **params), bounds=True, compiled=True)
        paths[name + "".join(f" {k}={v}" for k, v in params.items())] = result.config["engine_path"]
    from finemoe.policies.expert_maps import ExpertMapStore

    store = ExpertMapStore(2, 3, capacity=2, distance=1, semantic_dim=None)
    store.add(np.full((2, 3), 0.5))
    for queries in (1, 2):  # (a single query's row slices are contiguous arrays to numba, more are not)
        store.trajectory_matches(np.ones((queries, 2, 3)), 2)
    keys = np.array([0, 1, 0, 2, 1, 3], np.int64)
    lru_distances(keys)
    priority_distances(keys, np.arange(keys.size, dtype=np.float64))
    return paths
