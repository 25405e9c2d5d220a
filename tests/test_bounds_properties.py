"""bound <= oracle <= every registered policy, on random small workloads (hypothesis).

Per case: the lower bounds (sim/bounds.py) are at or below the oracle and every policy on loads,
bytes, TTFT, TPOT, e2e and makespan; the oracle (sim/offline.py) is at or below every policy on
loads (its fewest-loads candidate), time per output token (its chosen schedule) and at or above
every policy on hit rate (its highest-hit-rate candidate), every registered policy and every case
but those named in OPEN (each a strict xfail). Drawn over arrival modes (all, Poisson, file), batch
sizes, slow and fast links, tiny and large caches, one or several copy engines.

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

from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.offline import compared_policies, loads
from finemoe.sim.run import simulate
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

EPS = 1e-12  # seconds: the engine's picosecond ticks make equal times exactly equal
# The oracle (a schedule, not a bound) is held to a policy's time per token within one part in a
# million: two schedules with the same loads can differ by a few ps per copy in event order (0.5 ns
# of 2.3 ms seen). The lower bounds get no such slack.
ORACLE_RTOL = 1e-6
TIMES = ("ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "tpot_mean_s", "tpot_p50_s", "tpot_p99_s",
         "e2e_mean_s", "e2e_p50_s", "e2e_p99_s")
_STAMPS = Path(tempfile.mkdtemp(prefix="finemoe-bounds-"))


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
    for name, r in [("oracle", oracle)] + [(p, run(p)) for p in compared_policies(trace)]:
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
        if s["tpot_mean_s"] < b["tpot_mean_s"] * (1 - ORACLE_RTOL) - EPS:
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


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
          database=None)
@given(cases())
def test_bound_oracle_policies_bracket(case):
    """bound <= oracle <= every policy; the oracle's claims are waived only on the cases named in
    OPEN (each its own strict xfail below), never wholesale."""
    _check(case, oracle_claims=case not in OPEN)


@pytest.mark.bounds_slow
@pytest.mark.skipif(os.environ.get("FINEMOE_SLOW_PROPERTIES") != "1",
                    reason="the 5,000-example run: set FINEMOE_SLOW_PROPERTIES=1")
@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_bound_oracle_policies_bracket_5000(case):
    _check(case, oracle_claims=case not in OPEN)


# Counterexamples hypothesis found, kept: (recipe, slots, batch, GB/s, copy engines, arrival, seed).
REGRESSIONS = [
    # cost-aware-no-gate's TPOT 0.2% below every candidate's under Poisson batching (found before
    # 2026-12-07): closed by the search's added ask (an expert asked for from its step's start
    # instead of its demand load).
    ((3, 2, 2, 2, 62), 3, 3, 32.0, 1, "poisson", 62),
    # MoE-Infinity prefetched a decode step's expert during the prefill (before its own demand
    # load) and so had a shorter time per output token than every oracle candidate then: time
    # before the first token does not count in TPOT. The "decode-first" candidate does the same.
    ((1, 3, 1, 3, 18), 2, 1, 0.25, 1, "all", 18),
    # cost-aware-no-gate 75% hits against the oracle's best 50% (2 layers x 2 experts, top-1, 2
    # slots): it left the first layer's expert to its demand load (late anyway on 0.25 GB/s) and
    # prefetched the second layer's, which then hit. Fixed by the "aggressive/far+2" candidate.
    ((2, 2, 1, 2, 25), 2, 1, 0.25, 1, "all", 25),
    # cost-aware-no-gate TPOT 11.5 us against the oracle's 104.9 us (1 layer x 3 experts, 2 slots):
    # during the prefill it fetched the expert a decode step needs first and let the prefill's own
    # come by demand. "decode-first" meant to, but ranked later steps too low and re-asked for the
    # prefill's own expert at its later use; fixed (policies/oracle.py: BOOST, first uses only).
    ((1, 3, 1, 2, 888), 2, 1, 0.25, 1, "all", 888),
    # Open until cost-aware's gate credited late copies in part (486621a): no policy beats the
    # oracle here now; kept so that none does again.
    ((2, 5, 2, 3, 1796), 6, 1, 0.25, 3, "all", 1796),
    ((3, 2, 2, 3, 5063), 3, 1, 0.25, 3, "file", 5063),
    ((3, 2, 2, 3, 3), 3, 1, 0.25, 2, "all", 3),
    ((3, 3, 2, 2, 62), 3, 3, 32.0, 1, "poisson", 62),
    # Open ("hit rate on three copy engines") until cost-aware's gate counted only the link's free
    # share of a right copy's lead as saved and a throttle chose its prefetch mode (section 4d of
    # docs/evaluation.md): no policy beats the oracle here now.
    ((3, 2, 1, 2, 824), 3, 1, 4.0, 3, "poisson", 824),
    # Found by the 5,000-example run: MoE-Infinity TPOT 31.7 us against the oracle's 65.0 us. It
    # prefetched, during the first request's prefill, the expert the second request's decode needs
    # 10 steps later; "decode-first" read only 16 accesses ahead and loaded it during that decode.
    # It now reads ahead to a cache-full of different experts during a prefill.
    ((3, 2, 1, 3, 6763), 4, 1, 0.25, 1, "all", 6763),
    # The next one it found: FineMoE TPOT 533 us against 982 (4 slots, a prefill and one decode step
    # of 3 different experts each). "decode-first" also prefetched the prefill's own later layers,
    # whose slots then evicted the decode step's experts it had brought; they come by demand now.
    ((3, 2, 1, 2, 6762), 4, 1, 0.25, 3, "all", 6762),
    # And on the first case's trace with 3 copy engines: MoE-Infinity 97.2% hits against the best
    # candidate's 94.4%; the far-looking candidates read only 16 accesses (3 experts) ahead. They read
    # on to a cache-full of different experts now.
    ((3, 2, 1, 3, 6763), 4, 1, 0.25, 3, "all", 6763),
    # Open until that fix, each a TPOT a policy reached below every candidate (cost-aware-no-recency
    # on slow links, three copy engines, timing-dependent batching): "decode-first" reaches it now.
    ((3, 2, 1, 3, 0), 3, 1, 0.25, 2, "poisson", 0),
    ((3, 2, 1, 3, 0), 3, 1, 0.25, 2, "all", 0),
    ((3, 2, 1, 3, 0), 3, 1, 0.25, 1, "file", 0),
    ((3, 2, 1, 3, 0), 3, 1, 0.25, 1, "poisson", 0),
    ((3, 2, 1, 3, 0), 3, 1, 0.25, 1, "all", 0),
    ((3, 2, 2, 2, 824), 3, 1, 4.0, 3, "poisson", 824),
    ((3, 2, 1, 3, 1), 2, 2, 4.0, 3, "poisson", 1),
    ((3, 2, 2, 4, 1844), 4, 2, 32.0, 1, "file", 1844),
    # Open ("tpot, cost-aware") until cost-aware counted a prefill's prompt tokens one by one
    # (docs/evaluation.md 4e): its batch-of-2 time per token is no longer below the oracle's.
    ((2, 2, 1, 4, 2), 2, 2, 0.25, 1, "all", 2),
    # Open ("hit rate on a cache of top-k slots": every candidate 0% hits, policies 2-9%) until the
    # "deadline" candidate (2026-12-06): it asks only for copies that can land in time behind the
    # ones asked for before them, so the link carries no late copy ahead of an on-time one.
    ((3, 5, 3, 3, 325), 3, 2, 32.0, 3, "poisson", 325),
    ((3, 5, 3, 4, 883), 3, 1, 4.0, 3, "all", 883),
    ((3, 5, 3, 4, 5), 3, 1, 4.0, 3, "all", 5),
    # Open ("hit rate (moe-infinity) on 3 slots": MoE-Infinity 63.6% hits against the best
    # candidate's 59.1%, prefills of 2-3 tokens on a slow link, and with a fourth request 76.5%
    # against 70.6%) until "deadline" far ahead leaving the nearest layer to its demand load
    # ("deadline/far+2", 2026-12-06).
    ((2, 4, 1, 3, 981), 3, 1, 0.25, 2, "all", 981),
    ((2, 4, 1, 3, 981), 3, 1, 0.25, 2, "poisson", 981),
    ((2, 4, 1, 3, 981), 3, 1, 0.5, 2, "all", 981),
    ((2, 4, 1, 4, 981), 3, 1, 0.25, 2, "all", 981),
    # Found by a 5,000-case random run (2026-12-06, the 12-candidate ensemble): finemoe's family and
    # ProMoE-like hit rates 2-4 points above every candidate's, and one TPOT; the two "deadline"
    # candidates reach them.
    ((3, 3, 2, 2, 2482), 4, 1, 0.5, 3, "all", 2482),
    ((3, 2, 2, 4, 9687), 4, 1, 0.5, 3, "all", 9687),
    ((3, 3, 3, 2, 8294), 8, 1, 0.25, 3, "all", 8294),
    ((3, 2, 2, 3, 3740), 4, 1, 0.5, 3, "poisson", 3740),
    # Open until the local search (sim/search.py, 2026-12-07), which reaches each by editing a
    # candidate: the cost-aware family's hit rates and TPOTs on slow links (dropping the late
    # prefetches that held the link; on the first, keeping the first layer's expert resident and
    # cycling the other slot, 9 hits of 19 against every candidate's 7), ...
    ((3, 2, 1, 2, 0), 2, 1, 32.0, 1, "poisson", 0),
    ((3, 2, 1, 2, 0), 2, 1, 32.0, 1, "all", 0),
    ((3, 2, 1, 2, 0), 2, 2, 4.0, 2, "all", 0),
    ((3, 2, 1, 2, 0), 2, 1, 4.0, 3, "all", 0),
    ((3, 2, 1, 2, 0), 2, 1, 4.0, 2, "poisson", 0),
    ((3, 2, 1, 2, 0), 2, 1, 4.0, 2, "all", 0),
    ((3, 2, 2, 3, 0), 3, 1, 0.25, 1, "file", 0),
    ((3, 2, 2, 3, 0), 3, 1, 0.25, 1, "poisson", 0),
    ((3, 2, 2, 3, 0), 3, 1, 0.25, 1, "all", 0),
    # ... a batch needing 4 experts of one layer on 3 slots, where Belady's victim order cost
    # finemoe's one load fewer (keeping the victim Belady chose), a cache of top-k slots, a large
    # cache with file arrivals, MoE-Infinity's TPOT 1% below on 2 slots, and finemoe-lru's 32 us
    # against 129 on 6 slots (it loaded the decode steps' experts during the prefill).
    ((1, 4, 3, 4, 3), 3, 2, 0.25, 1, "all", 3),
    ((3, 3, 2, 3, 1360), 2, 2, 4.0, 3, "poisson", 1360),
    ((3, 4, 2, 3, 4461), 11, 1, 4.0, 3, "file", 4461),
    ((1, 5, 1, 3, 7990), 2, 1, 0.25, 3, "all", 7990),
    ((3, 3, 1, 3, 3681), 6, 1, 0.25, 1, "all", 3681),
    # Lost in the 5,000-case run of 2026-12-07 (not named before: the slow test failed on them),
    # closed when the hit-rate climb took its kinds of move in turn (sim/search.py, `IN_TURN`):
    # the cost-aware family 3-8 points of hit rate above (on the last, 2.8 against every
    # candidate's 0%, a cache of top-k slots), and MoE-Infinity's TPOT 1 ns below.
    ((3, 4, 3, 2, 386), 4, 1, 0.5, 2, "poisson", 386),
    ((3, 3, 1, 3, 3), 2, 3, 0.5, 3, "file", 3),
    ((3, 4, 3, 3, 283), 3, 2, 32.0, 3, "all", 283),
    ((2, 5, 3, 2, 2), 3, 2, 0.25, 2, "file", 2),
    # Open until the search's budget doubled (60 runs per metric, 20 from one candidate; the same
    # day): cost-aware-no-gate's TPOT 1.4% below and cost-aware's hit rate 22.2% against 20.0% on
    # slow links, and finemoe's loads, hit rate and TPOT on 3 slots at top-2 (a 5,000-case run's).
    ((2, 2, 1, 4, 2), 3, 1, 0.25, 1, "all", 2),
    ((3, 3, 2, 4, 135), 3, 2, 0.25, 1, "all", 135),
    ((1, 4, 2, 4, 222), 3, 1, 0.5, 2, "all", 222),
    # ... and 14 of the 69 cases of that 5,000-case run still lost: the cost-aware family's TPOT
    # 0.03-1.5% below and hit rates 1.6-10.5 points above (on four, against every candidate's 0%
    # on a cache of top-k slots), SLRU's TPOT 8% below on 3 slots with file arrivals, and
    # MoE-Infinity's 10% below on 3 slots at top-2.
    ((2, 2, 1, 2, 1), 2, 1, 0.25, 1, "poisson", 1),
    ((2, 5, 2, 3, 382), 3, 2, 0.25, 2, "poisson", 382),
    ((2, 5, 2, 3, 382), 3, 3, 0.25, 2, "poisson", 382),
    ((3, 5, 1, 3, 403), 3, 1, 0.5, 1, "file", 403),
    ((3, 5, 3, 4, 4), 4, 3, 0.25, 1, "all", 4),
    ((2, 4, 2, 2, 207), 5, 2, 0.25, 3, "all", 207),
    ((3, 4, 3, 2, 2429), 3, 3, 0.5, 2, "all", 2429),
    ((2, 2, 1, 2, 1), 2, 2, 0.5, 1, "poisson", 1),
    ((3, 4, 3, 4, 992), 3, 3, 32.0, 2, "all", 992),
    ((2, 5, 3, 3, 160), 3, 1, 0.5, 3, "file", 160),
    ((2, 2, 1, 2, 1), 2, 1, 0.5, 1, "all", 1),
    ((2, 4, 3, 4, 4), 3, 3, 0.5, 2, "poisson", 4),
    ((2, 4, 3, 4, 4), 3, 2, 0.5, 2, "poisson", 4),
    ((1, 5, 2, 3, 8189), 3, 3, 0.25, 3, "poisson", 8189),
    # ... and 16 of the 55 left, closed by hit rate's sideways climbs with added asks free to evict
    # an expert needed as soon (2026-12-08): 14 on a cache of top-k slots (the cost-aware family's
    # and layerwise's hit rates 1-12 points above, most against every candidate's 0%, and
    # cost-aware-lru's TPOT 31% below on 2 slots with file arrivals), 2 on 5 slots at top-3.
    ((1, 4, 2, 4, 37), 2, 1, 4.0, 1, "file", 37),
    ((1, 4, 2, 4, 37), 2, 1, 4.0, 2, "file", 37),
    ((2, 4, 3, 2, 3), 3, 1, 32.0, 2, "all", 3),
    ((2, 4, 3, 2, 602), 3, 2, 1000.0, 2, "all", 602),
    ((2, 4, 3, 4, 430), 3, 3, 0.5, 2, "poisson", 430),
    ((2, 5, 3, 2, 2), 3, 1, 32.0, 2, "file", 2),
    ((2, 5, 3, 2, 2), 3, 3, 32.0, 2, "file", 2),
    ((2, 5, 3, 4, 1118), 3, 1, 4.0, 2, "all", 1118),
    ((3, 3, 3, 2, 1), 3, 1, 0.25, 1, "poisson", 1),
    ((3, 3, 3, 3, 3), 3, 3, 0.25, 1, "all", 3),
    ((3, 3, 3, 4, 3), 3, 3, 0.25, 1, "file", 3),
    ((3, 4, 3, 3, 124), 3, 1, 0.25, 1, "all", 124),
    ((3, 4, 3, 3, 2547), 5, 3, 0.25, 1, "all", 2547),
    ((3, 4, 3, 3, 313), 3, 1, 4.0, 1, "all", 313),
    ((3, 4, 3, 3, 3919), 5, 1, 32.0, 1, "poisson", 3919),
    ((3, 4, 3, 4, 3), 3, 3, 0.25, 1, "file", 3),
    # ... and 4 of the 39 left, and one that was open, closed by the demand schedule whose loads
    # cost the least time per token (2026-12-08, "tpot" victims): SLRU 9-11% below on TPOT (its
    # loads fall in prefills, Belady's in decode steps), LFU, ARC and SLRU under file arrivals.
    ((2, 3, 1, 4, 141), 3, 1, 0.5, 2, "poisson", 141),
    ((2, 3, 1, 4, 141), 3, 3, 0.5, 2, "poisson", 141),
    ((2, 3, 1, 4, 141), 3, 3, 0.5, 3, "poisson", 141),
    ((2, 3, 2, 4, 141), 5, 3, 0.5, 3, "poisson", 141),
    ((3, 3, 1, 4, 3908), 3, 2, 0.25, 2, "file", 3908),
    # ... and 18 more of them, closed by the candidates that make one new ask a hook (2026-12-08,
    # `ration`): hit rates of the cost-aware family and layerwise 1-10 points above, all on a cache
    # of exactly top-k = 3 slots.
    ((2, 4, 3, 3, 2), 3, 2, 1000.0, 2, "all", 2),
    ((2, 4, 3, 3, 3), 3, 2, 1000.0, 2, "all", 3),
    ((3, 3, 3, 3, 150), 3, 1, 0.25, 1, "poisson", 150),
    ((3, 3, 3, 3, 150), 3, 3, 0.25, 1, "poisson", 150),
    ((3, 3, 3, 3, 1981), 3, 1, 0.5, 1, "file", 1981),
    ((3, 3, 3, 3, 1981), 3, 3, 0.5, 1, "file", 1981),
    ((3, 3, 3, 3, 341), 3, 3, 0.5, 1, "poisson", 341),
    ((3, 4, 3, 2, 2456), 3, 1, 0.25, 1, "file", 2456),
    ((3, 4, 3, 2, 2456), 3, 3, 0.25, 1, "file", 2456),
    ((3, 4, 3, 2, 3), 3, 1, 0.25, 1, "poisson", 3),
    ((3, 4, 3, 3, 150), 3, 1, 1000.0, 2, "poisson", 150),
    ((3, 4, 3, 3, 4), 3, 3, 0.5, 2, "all", 4),
    ((3, 5, 3, 2, 138), 3, 2, 0.25, 1, "all", 138),
    ((3, 5, 3, 2, 2), 3, 3, 0.5, 2, "file", 2),
    ((3, 5, 3, 3, 1256), 3, 1, 0.25, 2, "poisson", 1256),
    ((3, 5, 3, 3, 2), 3, 2, 4.0, 2, "all", 2),
    ((3, 5, 3, 3, 2), 3, 3, 0.5, 2, "file", 2),
    ((3, 5, 3, 3, 2), 3, 3, 4.0, 2, "all", 2),
    # ... and 7 more, closed by hit rate's climbs from the rationed candidates, a pass of their own
    # after the others (2026-12-08).
    ((2, 4, 2, 2, 574), 2, 1, 4.0, 2, "poisson", 574),
    ((2, 4, 2, 2, 574), 2, 2, 4.0, 2, "poisson", 574),
    ((2, 5, 3, 2, 102), 4, 3, 32.0, 3, "all", 102),
    ((3, 3, 2, 2, 4996), 2, 1, 0.25, 2, "poisson", 4996),
    ((3, 3, 2, 2, 4996), 2, 2, 0.25, 2, "poisson", 4996),
    ((3, 3, 2, 2, 4996), 2, 2, 0.25, 3, "poisson", 4996),
    ((3, 5, 3, 3, 1256), 3, 3, 0.25, 3, "poisson", 1256),
    # ... and 3 of those named open that day, closed by the candidate that asks once per use
    # position (`spread`): cost-aware-no-gate's hit rate and cost-aware-no-history's TPOT, 8.6%
    # below, on 2 slots at top-2.
    ((3, 3, 2, 2, 2), 2, 3, 0.25, 2, "poisson", 2),
    ((3, 3, 2, 2, 2), 2, 2, 4.0, 2, "all", 2),
    ((3, 3, 2, 2, 5021), 2, 2, 4.0, 2, "file", 5021),
]


# Found and not fixed: a policy beats every oracle candidate here, so the oracle is wrong on these
# (docs/bounds.md, "Open counterexamples"). Strict: each says so once a candidate covers it. The
# default property test holds the oracle to its claims on every other case.
OPEN = {
    # The cost-aware family on slow links (found after 486621a): a prefetch placed or declined
    # differently that no edit of a candidate reaches within the search's budget.
    ((3, 2, 1, 3, 0), 2, 1, 4.0, 1, "all", 0): "tpot (cost-aware, 3.4% below)",
    # A tiny cache (slots = top-k = 3): every candidate hits 0%; policies spend extra loads on
    # prefetches into slots freed mid-layer and hit 2-8%.
    ((2, 5, 3, 3, 325), 3, 2, 32.0, 3, "poisson", 325): "hit rate on a cache of top-k slots",
    ((2, 5, 3, 3, 10), 3, 1, 1000.0, 3, "poisson", 10): "hit rate (and 12 ns of TPOT) on a cache of top-k slots",
    # Batches of 2-3 under Poisson or file arrivals: the batches depend on the run's own timing,
    # and a policy's timing gave batchings that need fewer loads or less time per token.
    ((3, 3, 2, 4, 79), 3, 2, 4.0, 2, "poisson", 79): "loads under timing-dependent batching (lfu)",
    ((3, 3, 2, 4, 79), 3, 2, 4.0, 3, "poisson", 79): "loads under timing-dependent batching (lfu)",
    ((3, 2, 2, 2, 1844), 4, 2, 32.0, 1, "file", 1844): "TPOT under timing-dependent batching (0.4% below)",
    # 7 of the 10 cases of a 5,000-example draw (dumped 2026-12-07) the oracle still lost on
    # 2026-12-08 (all on 2-4 slots; 3 more closed since), and the case `make test-slow` shrank its
    # failure to that day.
    ((3, 4, 3, 4, 0), 3, 1, 1000.0, 3, "all", 0): "hit rate on a cache of top-k slots (cost-aware, 3.3 points)",
    # Four of the 81 cases lost on 2026-12-07 that no later draw met, still lost on 2026-12-08.
    ((2, 3, 2, 3, 438), 2, 2, 0.5, 3, "file", 438): "hit rate on a cache of top-k slots (the cost-aware family)",
    ((2, 3, 2, 3, 438), 2, 3, 0.5, 3, "file", 438): "hit rate on a cache of top-k slots (the cost-aware family)",
    ((2, 3, 2, 4, 150), 2, 3, 0.5, 2, "all", 150): "hit rate on a cache of top-k slots (cost-aware-no-recency)",
    ((2, 5, 2, 3, 777), 2, 3, 0.5, 2, "all", 777): "hit rate on a cache of top-k slots (cost-aware-no-recency)",
    ((3, 3, 2, 3, 296), 2, 3, 32.0, 3, "all", 296): "TPOT (prev-token, 0.7 ns of 97 us below)",
    ((2, 3, 2, 2, 5159), 2, 1, 4.0, 2, "file", 5159): "hit rate on a cache of top-k slots (cost-aware-no-history)",
    ((2, 3, 2, 3, 2), 2, 1, 0.5, 2, "poisson", 2): "hit rate on a cache of top-k slots (cost-aware-lru)",
    ((2, 3, 2, 4, 1177), 2, 3, 0.5, 2, "file", 1177): "hit rate on a cache of top-k slots (cost-aware-lru)",
    ((2, 4, 2, 3, 130), 2, 1, 0.25, 2, "poisson", 130): "hit rate on a cache of top-k slots (cost-aware-lru)",
    ((3, 2, 1, 4, 27), 2, 1, 32.0, 1, "poisson", 27): "TPOT (the cost-aware family, 1.6% below)",
    ((3, 2, 2, 4, 660), 4, 2, 32.0, 1, "poisson", 660): "TPOT under Poisson batching (the cost-aware family, 2.0% below)",
}


@pytest.mark.parametrize("case", REGRESSIONS)
def test_bracket_regressions(case):
    _check(case)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=f"open: {why}"))
                                   for c, why in OPEN.items()])
def test_open_counterexamples(case):
    _check(case)
