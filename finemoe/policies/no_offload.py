"""Every expert resident from the start: the latency floor, and the memory ceiling.

With fewer slots than experts it refuses to run (ConfigError saying how many bytes more it needs)
rather than silently becoming another policy.
"""

from __future__ import annotations

from finemoe.errors import ConfigError
from finemoe.policies.base import Policy
from finemoe.policies.registry import register


@register
class NoOffloadPolicy(Policy):
    name = "no-offload"

    def bind(self, ctx) -> None:
        super().bind(ctx)
        g = ctx.geometry
        total = g.num_layers * g.num_experts
        if ctx.capacity_slots < total:
            short = (total - ctx.capacity_slots) * g.bytes_per_expert
            raise ConfigError(
                f"policy no-offload needs all {total} experts resident ({g.total_expert_bytes / 1e9:.2f} GB) but "
                f"the budget holds {ctx.capacity_slots} expert slots; it needs {short} bytes "
                f"({short / 1e9:.2f} GB) more GPU memory"
            )

    def initial_residents(self):
        g = self.ctx.geometry
        return [(layer, e) for layer in range(g.num_layers) for e in range(g.num_experts)]

    def choose_victim(self, evictable, for_prefetch, now_s):
        return None  # never needed: nothing is ever loaded
