"""The prefetch throttle: which mode runs each epoch, from measured time per token, worked out by hand;
and cost-aware feeding it decode steps' times."""

from __future__ import annotations

import pytest
from test_policy_cost_aware import HISTORY, _fitted, _gated

from finemoe.policies.base import LayerRouting, Sequence, StepInfo
from finemoe.policies.throttle import PrefetchThrottle


def _epochs(throttle: PrefetchThrottle, per_token_s, epochs: int) -> list[str]:
    """The mode of each of `epochs` epochs when a step under mode m takes per_token_s(m, epoch)."""
    modes = []
    while len(modes) < epochs:
        if throttle.epoch == len(modes):
            modes.append(throttle.mode)
        throttle.step_done(per_token_s(throttle.mode, throttle.epoch), 1)
    return modes


def test_each_mode_once_then_the_fastest_with_the_losers_retried_at_growing_waits():
    throttle = PrefetchThrottle(("a", "b", "c"), epoch_steps=2, first_wait=2)
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    # a, b, c once; then b. Both lose by more than 10%: c's wait goes 2 -> 8 when it loses at
    # epoch 2; after epoch 3, a has waited 4 - 0 > 2 epochs: retried, loses, waits 8 too. Neither
    # is due again before epoch 11 (11 - 2 > 8: c).
    assert _epochs(throttle, lambda m, e: times[m], 12) == ["a", "b", "c", "b", "a"] + ["b"] * 6 + ["c"]
    assert throttle.best() == "b"
    assert throttle.records["a"].wait == 8 and throttle.records["c"].wait == 8


def test_the_first_step_after_a_switch_is_not_measured():
    throttle = PrefetchThrottle(("a", "b"), epoch_steps=2, first_wait=2)
    throttle.step_done(1.0, 1)
    throttle.step_done(1.0, 1)  # epoch 0, a: 1 s per token; switch to b
    throttle.step_done(100.0, 1)  # b's first step pays for a's cache: not counted
    throttle.step_done(0.5, 2)  # 0.25 s per token
    assert throttle.records["b"].per_token_s == pytest.approx(0.25)
    assert throttle.mode == "b" and throttle.switches == 1


def test_a_retried_mode_that_now_wins_takes_over():
    throttle = PrefetchThrottle(("a", "b"), epoch_steps=2, first_wait=1)
    # b (1.9 s) beats a (2 s) until a turns fast (0.1 s) at epoch 3. a is retried at epoch 2 (still
    # slow, within 10%: its wait doubles to 2) and at 5, where its mean (2 + 0.1) / 2 beats b: a
    # runs from then, b retried once at once (its wait is 1) and losing by far (wait 4).
    modes = _epochs(throttle, lambda m, e: (2.0 if e < 3 else 0.1) if m == "a" else 1.9, 9)
    assert modes == ["a", "b", "a", "b", "b", "a", "b", "a", "a"]
    assert throttle.best() == "a" and throttle.records["a"].per_token_s == pytest.approx((1.05 + 0.1) / 2)
    assert throttle.records["b"].wait == 4


def test_bad_measurements_and_settings():
    throttle = PrefetchThrottle(("a",), epoch_steps=2)
    throttle.step_done(float("nan"), 1)
    throttle.step_done(1.0, 0)
    assert throttle._steps == 0
    with pytest.raises(ValueError, match="at least one mode"):
        PrefetchThrottle(())
    with pytest.raises(ValueError, match="at least 2 steps"):
        PrefetchThrottle(("a",), epoch_steps=1)


def test_cost_aware_times_decode_steps_up_to_their_last_routed_layer():
    policy, trace = _fitted(HISTORY)
    throttle = policy._throttle
    prefill = StepInfo(0, 0.0, (Sequence(0, 0, 0, 1),), trace)
    policy.on_step_start(prefill)
    policy.on_layer_routed(LayerRouting(prefill, 1, 0.4, trace))
    decode = StepInfo(1, 1.0, (Sequence(0, 1, 0, 1),), trace)
    policy.on_step_start(decode)  # the prefill step is not a decode step: not fed
    assert throttle._steps == 0
    policy.on_layer_routed(LayerRouting(decode, 0, 1.1, trace))
    policy.on_layer_routed(LayerRouting(decode, 1, 1.3, trace))
    policy.on_step_start(StepInfo(2, 5.0, (Sequence(0, 2, 0, 1),), trace))  # waited idle until 5 s
    assert throttle._steps == 1 and throttle._time_s == pytest.approx(0.3) and throttle._tokens == 1


def test_cost_aware_prefetches_as_its_throttles_mode_says():
    from test_policy_cost_aware import _decode

    got = {}
    for mode in ("gated", "eager", "off"):
        policy, trace = _gated([[(0, 1), (0, 1), (0, 1)]] * 8)
        policy._throttle.mode = mode
        step = _decode(policy, trace, layer_s=0.05, demand=0.5)
        got[mode] = {(f.layer, f.expert) for f in policy.on_layer_routed(LayerRouting(step, 0, 0.0, trace))}
    assert got["gated"] == got["eager"] == {(2, 0), (2, 1)}  # p = 0.9: both modes take them
    assert got["off"] == set()
    policy, trace = _fitted(HISTORY)
    assert policy.describe()["stats"]["prefetch_mode"] == "gated"  # nothing measured yet
