"""Fiddler (Kamahori et al., ICLR 2025): the experts most used on the history split are placed on
the GPU when the model loads; a missed expert is computed wherever the latency model says is
sooner: on the CPU (its FFN from host memory, plus the hidden states out and back), or on the GPU
after copying its weights (the copy, then the GPU's FFN). Decode tokens (one per expert) mostly stay
on the CPU, prompts' experts with many tokens go to the GPU.

The copies use `top_k` scratch slots kept out of the placement (at least), each freed once its
layer is done: Fiddler copies a missed expert's weights into a temporary buffer.
"""

from __future__ import annotations

import numpy as np

from finemoe.policies.base import COPY_ONCE, CPU
from finemoe.policies.moe_infinity import activation_matrix
from finemoe.policies.placement import CpuExecutingPolicy
from finemoe.policies.registry import register
from finemoe.policies.static_hot import hottest


@register
class FiddlerPolicy(CpuExecutingPolicy):
    """Popular experts on the GPU; per miss, the cheaper of copying it or computing it on the CPU."""

    name = "fiddler"
    uses_history = True

    def scratch_slots(self) -> int:
        g = self.ctx.geometry
        base = super().scratch_slots()
        return min(self.ctx.capacity_slots, max(base, g.top_k))

    def fit(self, history) -> None:
        counts = activation_matrix(history, np.arange(history.num_tokens))
        self.static = hottest(counts, self.placement_slots())

    def place(self, layer: int, expert: int, tokens: int) -> str:
        costs = self.ctx.costs
        on_gpu = costs.expert_load_s + costs.expert_compute_s(tokens)
        on_cpu = costs.cpu_expert_s(tokens) + 2.0 * costs.activation_copy_s(tokens)
        return COPY_ONCE if on_gpu < on_cpu else CPU
