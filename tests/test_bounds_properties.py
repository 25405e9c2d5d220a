"""bound <= oracle <= every registered policy, on random small workloads (hypothesis).

Per case: the lower bounds (sim/bounds.py) are at or below the oracle and every policy on loads,
bytes, TTFT, TPOT, e2e and makespan; the oracle (sim/offline.py) is at or below every policy on
loads (its fewest-loads candidate), time per output token (its chosen schedule) and at or above
every policy on hit rate (its highest-hit-rate candidate). Drawn over arrival modes (all, Poisson,
file), batch sizes, slow and fast links, tiny and large caches, one or several copy engines.

The default suite runs 200 examples; `FINEMOE_SLOW_PROPERTIES=1` adds a 5,000-example run (marked
`bounds_slow`, deselected by default in pyproject's addopts). Counterexamples found stay below as
regression cases.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finemoe.policies.registry import make_policy, policy_names
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.offline import loads
from finemoe.sim.run import simulate
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

EPS = 1e-12  # seconds: the engine's picosecond ticks make equal times exactly equal
TIMES = ("ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "tpot_mean_s", "tpot_p50_s", "tpot_p99_s",
         "e2e_mean_s", "e2e_p50_s", "e2e_p99_s")
_STAMPS = Path(tempfile.mkdtemp(prefix="finemoe-bounds-"))


def online_policies(trace) -> list[str]:
    """Every registered non-oracle policy this trace has the fields for (no-offload only fits a full cache)."""
    out = []
    for p in policy_names():
        if p in ("oracle", "no-offload") or p.startswith("test-"):
            continue
        if all(getattr(trace, f, None) is not None for f in make_policy(p).needs):
            out.append(p)
    return out


def workload(arrival: str, batch: int, seed: int, n: int) -> WorkloadConfig:
    if arrival == "poisson":
        return WorkloadConfig(max_batch=batch, history_fraction=0.4, arrival="poisson", rate_rps=400.0)
    if arrival == "file":
        path = _STAMPS / f"stamps-{seed}-{n}.txt"
        path.write_text("\n".join(f"{0.002 * i * (1 + seed % 3):.6f}" for i in range(n)) + "\n")
        return WorkloadConfig(max_batch=batch, history_fraction=0.4, arrival="file", timestamps_path=str(path))
    return WorkloadConfig(max_batch=batch, history_fraction=0.4)


def violations(trace, slots: int, batch: int, gbps: float, engines: int, arrival: str, seed: int,
               oracle_claims: bool = True) -> list[str]:
    """Every way this case breaks bound <= oracle <= policies (empty when it holds);
    `oracle_claims`: whether the oracle is held to beat every policy too (else bounds only)."""
    hw = PRESETS["rtx3090"].with_overrides(pcie_gbps=gbps, copy_engines=engines)
    wl = workload(arrival, batch, seed, len(trace.requests))

    def run(policy):
        return simulate(trace, SimConfig("synthetic", policy, hw, memory=MemoryConfig(expert_cache_slots=slots),
                                         workload=wl, seed=seed, timeline_steps=0))

    bad = []
    oracle = run("oracle")
    info = oracle.config["policy_info"]
    b = oracle.summary
    best_loads, best_hits = info["best_loads"], info["best_hit_rate"]
    if not b["bound_loads"] <= best_loads:
        bad.append(f"oracle loads {best_loads} below the bound {b['bound_loads']}")
    for name, r in [("oracle", oracle)] + [(p, run(p)) for p in online_policies(trace)]:
        s = r.summary  # its bounds are for the state it started from
        if loads(r) < s["bound_loads"] or s["bytes_h2d"] < s["bound_bytes_h2d"]:
            bad.append(f"{name} loads {loads(r)} below the bound {s['bound_loads']}")
        for k in TIMES + ("makespan_s",):
            if s[k] < s[f"bound_{k}"] - EPS:
                bad.append(f"{name} {k} {s[k]:.9f} below the bound {s[f'bound_{k}']:.9f}")
        if r.config["start_residents"] != oracle.config["start_residents"]:
            continue  # starts warm for free (static-hot): not comparable with the cold oracle
        if s["bound_loads"] != b["bound_loads"] or s["bound_tpot_mean_s"] != b["bound_tpot_mean_s"]:
            bad.append(f"{name}: the bound differs from the oracle's for the same start state")
        if name == "oracle" or not oracle_claims:
            continue
        if loads(r) < best_loads:
            bad.append(f"{name} loads {loads(r)} below the oracle's {best_loads}")
        if s["hit_rate"] > best_hits + EPS:
            bad.append(f"{name} hit rate {s['hit_rate']:.4f} above the oracle's {best_hits:.4f}")
        if s["tpot_mean_s"] < b["tpot_mean_s"] - EPS:
            bad.append(f"{name} tpot {s['tpot_mean_s']:.9f} below the oracle's {b['tpot_mean_s']:.9f}")
    return bad


def small_trace(L: int, J: int, K: int, requests: int, seed: int):
    return synthetic_trace(tiny_geometry(num_layers=L, num_experts=J, top_k=K), num_requests=requests,
                           prompt_tokens=(1, 3), generated_tokens=(1, 5), seed=seed)


@st.composite
def cases(draw):
    """(trace, slots, batch, link GB/s, copy engines, arrival, seed), the trace drawn by its recipe."""
    L = draw(st.integers(1, 3))
    J = draw(st.integers(2, 5))
    K = draw(st.integers(1, min(J, 3)))
    seed = draw(st.integers(0, 10_000))
    recipe = (L, J, K, draw(st.integers(2, 4)), seed)
    slots = draw(st.one_of(st.integers(K, K + 2), st.integers(K, L * J)))  # tiny and large caches
    return (recipe, slots, draw(st.integers(1, 3)), draw(st.sampled_from([0.25, 0.5, 4.0, 32.0, 1000.0])),
            draw(st.integers(1, 3)), draw(st.sampled_from(["all", "poisson", "file"])), seed)


def _check(case, oracle_claims: bool = True):
    recipe, *rest = case
    assert violations(small_trace(*recipe), *rest, oracle_claims=oracle_claims) == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(cases())
def test_bounds_hold_for_the_oracle_and_every_policy(case):
    """The lower bounds on everything (the oracle's own claims are the next test)."""
    _check(case, oracle_claims=False)


@pytest.mark.xfail(strict=False, reason="open: cost-aware-no-gate can beat every oracle candidate (OPEN below)")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(cases())
def test_oracle_beats_every_policy(case):
    _check(case)


@pytest.mark.bounds_slow
@pytest.mark.skipif(os.environ.get("FINEMOE_SLOW_PROPERTIES") != "1",
                    reason="the 5,000-example run: set FINEMOE_SLOW_PROPERTIES=1")
@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_bound_oracle_policies_bracket_5000(case):
    _check(case)


# Counterexamples hypothesis found, kept: (recipe, slots, batch, GB/s, copy engines, arrival, seed).
REGRESSIONS = [
    # MoE-Infinity prefetched a decode step's expert during the prefill (before its own demand
    # load) and so had a shorter time per output token than every oracle candidate then: time
    # before the first token does not count in TPOT. The "decode-first" candidate does the same.
    ((1, 3, 1, 3, 18), 2, 1, 0.25, 1, "all", 18),
]


# Found and not fixed yet: the oracle is wrong here (a policy has a higher hit rate than every
# candidate); strict, so the test says so once a candidate covers it.
OPEN = [
    # cost-aware-no-gate 75% hits against the oracle's best 50% (2 layers x 2 experts, top-1, 2 slots).
    ((2, 2, 1, 2, 25), 2, 1, 0.25, 1, "all", 25),
    # cost-aware-no-gate TPOT 11.5 us against the oracle's 104.9 us (1 layer x 3 experts, 2 slots).
    ((1, 3, 1, 2, 888), 2, 1, 0.25, 1, "all", 888),
]


@pytest.mark.parametrize("case", REGRESSIONS)
def test_bracket_regressions(case):
    _check(case)


@pytest.mark.xfail(strict=True, reason="open counterexample: a policy beats every oracle candidate")
@pytest.mark.parametrize("case", OPEN)
def test_open_counterexamples(case):
    _check(case)
