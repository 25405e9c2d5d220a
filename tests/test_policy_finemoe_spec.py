"""FineMoE as FINEMOE.md specifies it, where the code departed from it: the paper's prefetch
distance per model, and the LRU/LFU ablations keeping the window's protection."""

from __future__ import annotations

import dataclasses

import pytest
from test_policy_finemoe import _bound_policy
from test_policy_support import context

from finemoe.policies.base import LayerRouting, Prefetch
from finemoe.policies.finemoe import paper_distance
from finemoe.policies.registry import make_policy
from finemoe.traces.synthetic import tiny_geometry


@pytest.mark.parametrize(("model", "distance"), [("mixtral-8x7b", 3), ("Qwen3-30B-A3B", 6),
                                                 ("qwen1.5-moe-a2.7b", 6), ("phi-3.5-moe", 4),
                                                 ("finemoe-demo-moe", 3)])
def test_paper_distance_by_model(model, distance):
    assert paper_distance(model) == distance


def test_distance_follows_the_model_unless_given():
    qwen = dataclasses.replace(tiny_geometry(num_layers=8), model_name="qwen3-30b-a3b")
    policy = make_policy("finemoe")
    policy.bind(context(qwen))
    assert policy.distance == 6 and policy.describe()["params"]["distance"] == 6
    given = make_policy("finemoe", distance=2)
    given.bind(context(qwen))
    assert given.distance == 2


@pytest.mark.parametrize("name", ["finemoe-lru", "finemoe-lfu"])
def test_lru_and_lfu_ablations_keep_the_windows_protection(name):
    policy, step, measured = _bound_policy(name)
    for key in [(2, 3), (1, 1), (0, 0), (0, 2), (3, 2)]:  # the predicted ones loaded first: LRU's first victims
        policy.on_loaded(key, 0.0)
    policy.on_step_start(step)
    policy.on_layer_routed(LayerRouting(step, 0, 0.0, measured))
    policy.on_layer_routed(LayerRouting(step, 1, 0.0, measured))
    protected = {tuple(k) for k in zip(*policy.protected_mask().nonzero(), strict=True)}
    assert {(2, 3), (1, 1)} <= protected  # predicted this step for layers not yet passed
    order = policy.eviction_order()
    assert set(order[-len(protected & set(order)):]) == protected & set(order)  # protected go last
    victim = policy.choose_victim(lambda key: True, None, 0.0)
    assert victim not in protected
    only_protected = lambda key: key in {(2, 3), (1, 1)}  # noqa: E731
    assert policy.choose_victim(only_protected, Prefetch(0.9, 0, 3, 0), 0.0) is None
    assert policy.choose_victim(only_protected, None, 0.0) in {(2, 3), (1, 1)}
