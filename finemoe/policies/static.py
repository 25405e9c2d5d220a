"""Static expert placement, as llama.cpp's `--n-cpu-moe N` and `-ot` overrides make it: the experts
of N layers stay in host memory and are computed on the CPU, the rest live on the GPU; nothing is
copied while serving (unless `offload_batch` copies a large batch's experts, as llama.cpp does for
prompts).

`placement`: `first` (llama.cpp `--n-cpu-moe N`: layers 0..N-1 on the CPU), `last` (the last N), or
`hot` (what per-expert `-ot` rules and forks do: each layer's most used experts on the history split
on the GPU, the GPU's slots shared evenly over the layers, the rest to the most used of all).
`cpu_layers`: N, or `fit` (default): the fewest layers on the CPU that let the others fit the budget,
as llama.cpp's `--fit` chooses it.
"""

from __future__ import annotations

import numpy as np

from finemoe.errors import ConfigError
from finemoe.policies.base import ExpertKey, PolicyContext
from finemoe.policies.moe_infinity import activation_matrix
from finemoe.policies.placement import CpuExecutingPolicy
from finemoe.policies.registry import register
from finemoe.policies.static_hot import hottest

PLACEMENTS = ("first", "last", "hot")


def layer_placement(num_layers: int, num_experts: int, slots: int, cpu_layers, placement: str) -> list[ExpertKey]:
    """The experts on the GPU when whole layers go to the CPU: every expert of the layers not on it."""
    fit = num_layers - min(num_layers, slots // num_experts)
    n = fit if cpu_layers == "fit" else int(cpu_layers)
    if n < fit:
        raise ConfigError(f"{num_layers - n} layers of {num_experts} experts do not fit {slots} expert slots; "
                         f"use cpu_layers >= {fit} or fit")
    on_cpu = range(n) if placement == "first" else range(num_layers - n, num_layers)
    return [(layer, e) for layer in range(num_layers) if layer not in on_cpu for e in range(num_experts)]


def hot_placement(counts: np.ndarray, slots: int) -> list[ExpertKey]:
    """Each layer's `slots // L` most used experts, then the most used of the rest, up to `slots`."""
    L, J = counts.shape
    per = min(J, slots // L)
    chosen: list[ExpertKey] = []
    for layer in range(L):
        order = np.lexsort((np.arange(J), -counts[layer]))[:per]
        chosen.extend((layer, int(e)) for e in order)
    taken = set(chosen)
    rest = counts.copy()
    for layer, e in taken:
        rest[layer, e] = -1
    for key in hottest(np.where(rest < 0, 0, rest), slots - len(chosen)):
        if key not in taken:
            chosen.append(key)
    return chosen[:slots]


@register
class StaticPolicy(CpuExecutingPolicy):
    """Whole layers (or each layer's coldest experts) on the CPU, the rest resident on the GPU."""

    name = "static"
    uses_history = True  # `hot` ranks experts by their use on the history split

    def __init__(self, placement: str = "first", cpu_layers="fit", offload_batch="off") -> None:
        super().__init__(offload_batch)
        if placement not in PLACEMENTS:
            raise TypeError(f"placement is one of {', '.join(PLACEMENTS)}, got {placement!r}")
        if cpu_layers != "fit" and (isinstance(cpu_layers, bool) or not isinstance(cpu_layers, int) or cpu_layers < 0):
            raise TypeError(f"cpu_layers is a whole number of layers or fit, got {cpu_layers!r}")
        self.placement, self.cpu_layers = placement, cpu_layers
        self.params = {"placement": placement, "cpu_layers": cpu_layers, "offload_batch": offload_batch}

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        g = ctx.geometry
        if self.placement != "hot":
            if self.cpu_layers != "fit" and self.cpu_layers > g.num_layers:
                raise ConfigError(f"cpu_layers {self.cpu_layers} is more than the model's {g.num_layers} layers")
            self.static = layer_placement(g.num_layers, g.num_experts, self.placement_slots(), self.cpu_layers,
                                          self.placement)

    def fit(self, history) -> None:
        if self.placement == "hot":
            counts = activation_matrix(history, np.arange(history.num_tokens))
            self.static = hot_placement(counts, self.placement_slots())
