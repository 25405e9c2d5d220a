"""Previous-token prediction: each sequence's next token uses the experts its last token used.

When layer l of a step has routed, the experts each sequence's previous token used at layer
l + `distance` are prefetched for this step (at step start, those of layers 0..distance-1); the
priority is the share of the batch's sequences voting for the expert over the layers ahead
(votes / (target - current layer)). A sequence's first step (its prefill) has no previous token; after
it, the previous token of the first decode step is the prompt's last. LRU cache.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from finemoe.policies.base import (
    ExpertKey,
    LayerRouting,
    PolicyContext,
    Prefetch,
    StepInfo,
    ranked_prefetches,
)
from finemoe.policies.caches import TrackedCachePolicy
from finemoe.policies.registry import register


@register
class PrevTokenPolicy(TrackedCachePolicy):
    """Prefetch the previous token's experts `distance` layers ahead; LRU eviction."""

    name = "prev-token"

    def __init__(self, distance: int = 3) -> None:
        super().__init__()
        if int(distance) < 1:
            raise TypeError(f"distance must be at least 1 layer, got {distance}")
        self.distance = int(distance)
        self.params = {"distance": self.distance}

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.L = ctx.geometry.num_layers
        self.last: dict[int, list[tuple[int, ...]]] = {}  # request -> per layer, its last token's experts
        self._step: StepInfo | None = None

    def previous(self, request_id: int, layer: int) -> tuple[int, ...]:
        """The experts the request's previous token used at `layer` (empty before its first)."""
        rows = self.last.get(request_id)
        return rows[layer] if rows is not None else ()

    def on_step_start(self, step: StepInfo) -> Iterable[Prefetch]:
        self._step = step
        return self._predict(step, range(min(self.distance, self.L)), -1)

    def on_layer_routed(self, routing: LayerRouting) -> Iterable[Prefetch]:
        step, layer = routing.step, routing.layer
        out = self._predict(step, [layer + self.distance] if layer + self.distance < self.L else [], layer)
        for i, seq in enumerate(step.sequences):  # record after predicting: layer l+d still holds the last token's
            experts = routing.experts(i)
            if len(experts) == 0:
                continue
            rows = self.last.setdefault(seq.request_id, [()] * self.L)
            rows[layer] = tuple(e for e in np.asarray(experts[-1]).tolist() if e >= 0)
        return out

    def _predict(self, step: StepInfo, targets, current: int) -> list[Prefetch]:
        n = len(step.sequences)
        priorities: dict[ExpertKey, float] = {}
        for target in targets:
            for seq in step.sequences:
                for e in self.previous(seq.request_id, target):
                    key = (target, e)
                    priorities[key] = priorities.get(key, 0.0) + 1.0 / (n * (target - current))
        return ranked_prefetches(step.step, priorities)

    def on_request_finished(self, request_id: int, trace) -> None:
        self.last.pop(request_id, None)
