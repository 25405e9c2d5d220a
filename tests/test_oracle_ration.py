"""The oracle's rationed candidates (`ration`): at most that many new asks a hook, and their place in
the ensemble (small instances only, climbed from in their own pass); by a lost case of the 5,000-example run."""

from __future__ import annotations

import pytest
from test_bounds_properties import small_trace, workload

from finemoe.errors import ConfigError
from finemoe.policies.registry import make_policy
from finemoe.sim.config import MemoryConfig, SimConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.offline import CANDIDATES, SMALL_CANDIDATES, _climbs, _label
from finemoe.sim.run import simulate, simulate_policy

# 3 layers x 3 experts, top-3, 3 slots, 0.25 GB/s, one copy engine: every access is a load, and
# a hit is a copy for the next layer that lands before it starts.
CASE = ((3, 3, 3, 3, 150), 3, 1, 0.25, 1, "poisson", 150)


def _config(case):
    recipe, slots, batch, gbps, engines, arrival, seed = case
    hw = PRESETS["rtx3090"].with_overrides(pcie_gbps=gbps, copy_engines=engines)
    trace = small_trace(*recipe)
    return trace, SimConfig("synthetic", "oracle", hw, memory=MemoryConfig(expert_cache_slots=slots),
                            workload=workload(arrival, batch, seed, len(trace.requests)), seed=seed, timeline_steps=0)


def _recorded(policy):
    """The policy, with the (step, layer) of each ask each hook returned in `policy.asks_per_hook`."""
    policy.asks_per_hook = []
    for hook in ("on_step_start", "on_layer_routed"):
        plain = getattr(policy, hook)

        def recorded(arg, plain=plain):
            asks = list(plain(arg))
            policy.asks_per_hook.append([(a.step, a.layer) for a in asks])
            return asks

        setattr(policy, hook, recorded)
    return policy


def test_a_rationed_candidate_makes_at_most_its_ration_of_new_asks_a_hook():
    trace, config = _config(CASE)
    free = _recorded(make_policy("oracle", prefetch="aggressive", lookahead_layers=2))
    one = _recorded(make_policy("oracle", prefetch="aggressive", lookahead_layers=2, ration=1))
    r_free, r_one = simulate_policy(trace, config, free), simulate_policy(trace, config, one)
    assert max(map(len, free.asks_per_hook)) > 1
    assert max(map(len, one.asks_per_hook)) == 1
    # On this cache the rationed copies land between the current layer's demand loads and hit.
    assert r_one.summary["hit_rate"] > r_free.summary["hit_rate"]


def test_the_ensemble_beats_cost_aware_on_hit_rate_here():
    trace, config = _config(CASE)
    oracle = simulate(trace, config)
    cost_aware = simulate(trace, SimConfig(**{**config.__dict__, "policy": "cost-aware-fixed"}))
    assert oracle.config["policy_info"]["best_hit_rate"] >= cost_aware.summary["hit_rate"] > 0.2
    assert "-ask" in oracle.config["policy_info"]["best_hit_rate_candidate"]


def test_rationed_candidates_join_only_small_instances_and_climb_in_their_own_pass():
    rationed = [c for c in SMALL_CANDIDATES if c.get("ration")]
    assert rationed and not any(c.get("ration") for c in CANDIDATES)
    assert all(_climbs(c) == (None, "rationed") for c in rationed)
    assert _label(rationed[0], 0) == "aggressive/1/1-ask#0"
    with pytest.raises(ConfigError, match="ration must be at least 1"):
        make_policy("oracle", prefetch="aggressive", ration=0)


def test_a_spread_candidate_asks_once_per_use_position_a_hook():
    trace, config = _config(((3, 3, 2, 2, 2), 2, 2, 4.0, 2, "all", 2))
    policy = _recorded(make_policy("oracle", prefetch="aggressive", lookahead_layers=2, spread=True))
    spread = simulate_policy(trace, config, policy)
    assert any(len(p) > 1 for p in policy.asks_per_hook)  # asks for several layers at one hook
    assert all(len(p) == len(set(p)) for p in policy.asks_per_hook)  # never two for one layer
    plain = simulate_policy(trace, config, make_policy("oracle", prefetch="aggressive", lookahead_layers=2))
    assert spread.summary["hit_rate"] > plain.summary["hit_rate"]
    assert _label({"prefetch": "aggressive", "lookahead_layers": 2, "spread": True}, 0) == "aggressive/2/spread#0"
