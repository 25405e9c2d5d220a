"""The oracle's shortcuts give its plain schedule: remembering the farthest victim between asks,
not asking again for a prefetch still queued or sent since the cache last could drop it, and the
view's first uses read by one compiled pass. Each candidate runs with and without them on random
workloads (hypothesis), and every result field agrees."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sim_compiled import assert_same, workloads

from finemoe.policies.base import OracleView
from finemoe.policies.oracle import OraclePolicy
from finemoe.sim.offline import CANDIDATES
from finemoe.sim.run import simulate_policy


class PlainOracle(OraclePolicy):
    """The same schedule read the plain way: every victim a fresh heap scan, every ask re-submitted
    (the engine's queue skips it), the first uses read access by access (`OracleView`'s own)."""

    remembers_asks = False

    def bind(self, ctx) -> None:
        super().bind(dataclasses.replace(ctx, queued=None))
        self.view = _PlainView(self.view)

    def _farthest(self, evictable):
        return self._scan_victim(evictable)


class _PlainView(OracleView):
    """The engine's view with `first_use_arrays` derived from `first_uses` (the interface's default)."""

    def __init__(self, view) -> None:
        self._view = view
        self.num_layers = view.num_layers

    @property
    def version(self) -> int:
        return self._view.version

    def next_use(self, key, after):
        return self._view.next_use(key, after)

    def upcoming(self, after, limit):
        return self._view.upcoming(after, limit)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.sampled_from(CANDIDATES))
def test_oracle_shortcuts_give_the_plain_schedule(case, params):
    trace, config = case
    config = dataclasses.replace(config, policy="oracle")
    fast = simulate_policy(trace, config, OraclePolicy(**params), compiled=False)
    plain = simulate_policy(trace, config, PlainOracle(**params), compiled=False)
    assert_same(fast, plain)
