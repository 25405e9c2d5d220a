"""No policy beats the oracle's hit rate: the highest any of its clairvoyant candidate schedules
reaches (`best_hit_rate`, sim/offline.py), on the same link and cold start."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.run import simulate
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

POLICIES = ["lru", "lfu", "layerwise", "finemoe", "finemoe-trajectory", "finemoe-no-delta", "finemoe-lru",
            "finemoe-topk", "moe-infinity", "mixtral-offloading", "promoe"]


def _hit_rate(trace, policy: str, slots: int, batch: int, seed: int, online: bool) -> float:
    config = SimConfig(
        trace_path="<memory>",
        policy=policy,
        hardware=PRESETS["rtx3090"],
        memory=MemoryConfig(expert_cache_slots=slots),
        workload=WorkloadConfig(max_batch=batch, online=online),
        seed=seed,
    )
    result = simulate(trace, config)
    return result.config["policy_info"].get("best_hit_rate", result.summary["hit_rate"])


def _check_no_policy_beats_the_oracle(seed, slots, batch, online):
    trace = synthetic_trace(tiny_geometry(num_layers=6, num_experts=8), num_requests=6,
                            prompt_tokens=(2, 6), generated_tokens=(4, 10), seed=seed)
    bound = _hit_rate(trace, "oracle", slots, batch, seed, online)
    for policy in POLICIES:
        got = _hit_rate(trace, policy, slots, batch, seed, online)
        assert got <= bound + 1e-12, f"{policy} hit rate {got:.4f} above the oracle's {bound:.4f}"


# The same six cases on every run (conftest.py's profile), so that CI does not fail on the day the random
# draw meets an open counterexample; those found by random runs stay below.
@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 1000),
    slots=st.integers(4, 40),
    batch=st.sampled_from([1, 3]),
    online=st.booleans(),
)
def test_no_policy_beats_the_oracle(seed, slots, batch, online):
    _check_no_policy_beats_the_oracle(seed, slots, batch, online)


# Found by a random run of the test above (2026-12-06): ProMoE 86.60% hits against the best
# candidate's 86.12% (6 layers x 8 experts, top-2, 39 slots, batches of 3, all arrive at once).
# Open until the search's sideways hit-rate climbs (2026-12-08).
@pytest.mark.slow
def test_regression_promoe_on_a_large_cache():
    _check_no_policy_beats_the_oracle(seed=188, slots=39, batch=3, online=False)


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("slots", [25, 62])
def test_no_policy_beats_the_oracle_on_the_real_mixtral_trace(mixtral_trace_path, slots):
    """The same bound where the link is saturated (Mixtral experts, 25 or 62 slots of 256). An
    oracle that loads by next use alone failed it: all its prefetches landed late, so FineMoE's
    early ones gave it more hits (found by the evaluation, see docs/evaluation.md)."""
    from finemoe.traces.io import read_trace

    out = mixtral_trace_path
    trace = read_trace(out)

    def hit_rate(policy):
        config = SimConfig(trace_path=str(out), policy=policy, hardware=PRESETS["rtx3090"],
                           memory=MemoryConfig(expert_cache_slots=slots), seed=2)  # measures gsm8k/1
        result = simulate(trace, config)
        return result.config["policy_info"].get("best_hit_rate", result.summary["hit_rate"])

    bound = hit_rate("oracle")
    for policy in ("finemoe-topk", "promoe", "moe-infinity", "lfu", "lru", "layerwise"):
        got = hit_rate(policy)
        assert got <= bound + 1e-12, f"{policy} hit rate {got:.4f} above the oracle's {bound:.4f}"


def test_the_oracles_wall_time_is_every_candidates():
    """A sweep's timing of the oracle is what finding it cost: the sum over its candidate runs and
    its local search's runs (of which the best per metric are listed beside the candidates)."""
    trace = synthetic_trace(tiny_geometry(num_layers=3, num_experts=4), num_requests=4, prompt_tokens=(2, 3),
                            generated_tokens=(2, 4), seed=1)
    config = SimConfig(trace_path="<memory>", policy="oracle", hardware=PRESETS["rtx3090"],
                       memory=MemoryConfig(expert_cache_slots=5))
    result = simulate(trace, config)
    candidates = result.config["policy_info"]["candidates"]
    assert len(candidates) >= 12 and all(c["wall_s"] > 0 for c in candidates)
    info = result.config["policy_info"]
    assert info["search_runs"] > 0 and info["search_wall_s"] > 0
    own = sum(c["wall_s"] for c in candidates if "edits" not in c["candidate"])
    assert result.summary["wall_s"] == pytest.approx(own + info["search_wall_s"])
    assert result.summary["layer_steps_per_wall_s"] == pytest.approx(
        result.summary["layer_steps"] / result.summary["wall_s"])
