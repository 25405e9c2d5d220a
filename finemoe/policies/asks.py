"""A policy's prefetch asks for a run of planned steps, as arrays: what a compiled engine path
reads instead of calling `on_step_start` / `on_layer_routed` once per layer-step
(sim/compiled_prefetch.py). Only for policies whose asks depend on the routing alone, not on the
cache or the clock."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finemoe.policies.base import Prefetch


@dataclass(frozen=True)
class PlannedAsks:
    """Per planned step s and hook h (0: the step's start; l + 1: after layer l's routing) the asks
    a in [lo[s, h], hi[s, h]), in the order the hook returns them: expert `experts[a]` of layer
    `layers[a]` for engine step `step[s, h]`, at `priority[a]`. Groups may share a slice."""

    lo: np.ndarray  # int64 [steps, layers + 1]
    hi: np.ndarray
    step: np.ndarray
    layers: np.ndarray  # int64 [asks]
    experts: np.ndarray  # int64 [asks]
    priority: np.ndarray  # float64 [asks]
    wants_step: bool  # the policy has a step hook (the engine syncs its clock there)

    def prefetches(self, s: int, h: int) -> list[Prefetch]:
        """Group (s, h) as the hook's `Prefetch` list (what tests compare with the hook)."""
        lo, hi, step = int(self.lo[s, h]), int(self.hi[s, h]), int(self.step[s, h])
        return [Prefetch(p, step, layer, e) for layer, e, p in zip(
            self.layers[lo:hi].tolist(), self.experts[lo:hi].tolist(), self.priority[lo:hi].tolist(), strict=True)]
