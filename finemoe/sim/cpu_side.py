"""The CPU half of one MoE layer, shared by the simulator and the replayer so both split a policy's
answer and time the CPU side the same way (docs/cpu-execution.md).

`split_misses` turns `Policy.place_misses` into what the engine does: misses copied to the GPU
(`COPY`, `COPY_ONCE` ones also listed as temporary), misses computed on the CPU with their token
counts, and those of them also copied for later (`CPU_AND_COPY`). `CpuTimer` gives the modelled CPU
side of a layer: the hidden states to the CPU, its experts back to back, the outputs back, the
GPU's synchronisation, in integer ticks (cached per token count, as the engine's hot loop needs).
"""

from __future__ import annotations

from dataclasses import dataclass

from finemoe.policies.base import COPY, COPY_ONCE, CPU, CPU_AND_COPY, Policy
from finemoe.sim.cache import PolicyError
from finemoe.sim.costs import TICKS_PER_S, CostModel, to_ticks
from finemoe.sim.metrics import MetricsRecorder
from finemoe.traces.geometry import Geometry

_S = 1.0 / TICKS_PER_S


@dataclass(frozen=True)
class MissSplit:
    copy: list[int]  # misses the GPU waits for (COPY and COPY_ONCE), in access order
    once: list[int]  # of `copy`, the temporary ones (their slots free after the layer)
    cpu: list[tuple[int, int]]  # (expert, tokens) computed on the CPU, in access order
    later: list[int]  # of `cpu`, also copied to the GPU for the next step (CPU_AND_COPY)


def split_misses(policy: Policy, layer: int, misses: list[int], tokens: list[int], step_tokens: int,
                 now_s: float) -> MissSplit:
    """The policy's placement of `layer`'s misses, checked: any other answer is a PolicyError."""
    where = policy.place_misses(layer, list(misses), list(tokens), step_tokens, now_s)
    copy, once, cpu, later = [], [], [], []
    for e, n in zip(misses, tokens, strict=True):
        w = where.get(e, COPY)
        if w == COPY or w == COPY_ONCE:
            copy.append(e)
            if w == COPY_ONCE:
                once.append(e)
        elif w == CPU or w == CPU_AND_COPY:
            cpu.append((e, n))
            if w == CPU_AND_COPY:
                later.append(e)
        else:
            raise PolicyError(f"policy {policy.name} placed expert {e} of layer {layer} at {w!r}; "
                              f"place_misses returns {COPY!r}, {COPY_ONCE!r}, {CPU!r} or {CPU_AND_COPY!r}")
    return MissSplit(copy, once, cpu, later)


def activation_bytes(geometry: Geometry, step_tokens: int) -> int:
    """One direction of a layer's hand-off: the step's hidden states."""
    return int(step_tokens * geometry.hidden_size * geometry.dtype_bytes)


def record_cpu_layer(rec: MetricsRecorder, geometry: Geometry, step: int, layer: int,
                     spans: list[tuple[int, float, float]], step_tokens: int, timeline: bool) -> None:
    """A layer's CPU side in the run's counters: each expert's (expert, start_s, end_s) on the
    timeline, the experts run there, their busy time (the experts' own spans), bytes each way."""
    busy = 0.0
    for e, a, b in spans:
        if timeline:
            rec.event("cpu", "expert", step, layer, e, a, b, True)
        busy += b - a
    nbytes = activation_bytes(geometry, step_tokens)
    rec.cpu_experts += len(spans)
    rec.cpu_busy_s += busy
    rec.bytes_d2h += nbytes
    rec.bytes_h2d_activations += nbytes


class CpuTimer:
    """The modelled CPU side of a layer, in ticks: it starts when the router's output is known."""

    def __init__(self, costs: CostModel) -> None:
        if costs.cpu is None:
            raise ValueError("CPU-executing policies need a cost model with a CPU profile")
        self.costs = costs
        self.sync = to_ticks(costs.cpu.sync_s)
        self._expert: dict[int, int] = {}
        self._act: dict[int, int] = {}

    def expert_ticks(self, tokens: int) -> int:
        got = self._expert.get(tokens)
        if got is None:
            got = self._expert[tokens] = to_ticks(self.costs.cpu_expert_s(tokens))
        return got

    def activation_ticks(self, step_tokens: int) -> int:
        got = self._act.get(step_tokens)
        if got is None:
            got = self._act[step_tokens] = to_ticks(self.costs.activation_copy_s(step_tokens))
        return got

    def schedule(self, start: int, step_tokens: int,
                 experts: list[tuple[int, int]]) -> tuple[list[tuple[int, float, float]], int]:
        """Each CPU expert's (expert, start_s, end_s) for `experts` as (expert, tokens), and the tick
        at which the layer's CPU result is back on the GPU: hand-off, experts back to back, hand-off
        back, synchronisation."""
        act = self.activation_ticks(step_tokens)
        t = start + act
        spans = []
        for e, n in experts:
            c = self.expert_ticks(n)
            spans.append((e, t * _S, (t + c) * _S))
            t += c
        return spans, t + act + self.sync
