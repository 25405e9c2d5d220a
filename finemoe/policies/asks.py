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


class AskBuilder:
    """Builds a `PlannedAsks`: slices of asks appended as arrays, then assigned to (step, hook)
    groups (a slice may serve many)."""

    def __init__(self, steps: int, num_layers: int, first_step: int) -> None:
        self.lo = np.zeros((steps, num_layers + 1), np.int64)
        self.hi = np.zeros((steps, num_layers + 1), np.int64)
        self.step = np.broadcast_to(first_step + np.arange(steps, dtype=np.int64)[:, None],
                                    (steps, num_layers + 1)).copy()
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._size = 0

    def append(self, layers, experts, priority) -> int:
        """Add a slice of asks; returns where it starts."""
        at = self._size
        self._parts.append((np.asarray(layers, np.int64), np.asarray(experts, np.int64),
                            np.asarray(priority, np.float64)))
        self._size += len(self._parts[-1][0])
        return at

    def hook(self, s: int, h: int, prefetches) -> None:
        """Group (s, h) is the hook's list of `Prefetch` (all for one step, as every hook's are)."""
        prefetches = list(prefetches)
        lo = self.append([p.layer for p in prefetches], [p.expert for p in prefetches],
                         [p.priority for p in prefetches])
        self.lo[s, h], self.hi[s, h] = lo, lo + len(prefetches)
        if prefetches:
            self.step[s, h] = prefetches[0].step

    def build(self, wants_step: bool) -> PlannedAsks:
        if self._parts:
            layers, experts, priority = (np.concatenate(p) for p in zip(*self._parts, strict=True))
        else:
            layers, experts, priority = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        return PlannedAsks(self.lo, self.hi, self.step, layers, experts, priority, wants_step)


def hook_asks(policy, trace, steps, first_step: int, builder: AskBuilder, which=None) -> None:
    """The policy's own hooks called for planned steps `which` (all by default), in step order, as
    the engine calls them, their asks put in `builder`: right for any policy whose asks depend on
    the routing alone (the reference the vectorised `planned_asks` are tested against)."""
    from finemoe.policies.base import LayerRouting, Policy, StepInfo

    cls = type(policy)
    wants_step = cls.on_step_start is not Policy.on_step_start
    L = policy.ctx.geometry.num_layers
    for s in range(len(steps)) if which is None else which:
        info = StepInfo(first_step + s, 0.0, steps[s], trace)
        if wants_step:
            builder.hook(s, 0, policy.on_step_start(info) or ())
        for layer in range(L):
            builder.hook(s, layer + 1, policy.on_layer_routed(LayerRouting(info, layer, 0.0, trace)) or ())
