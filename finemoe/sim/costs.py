"""Pure cost functions of the timing model (see docs/timing-model.md): a roofline for compute and a
latency + bytes/bandwidth law for host-to-device copies. No simulation state lives here."""

from __future__ import annotations

from dataclasses import dataclass

from finemoe.sim.cpu import CpuSpec
from finemoe.sim.hardware import HardwareSpec
from finemoe.traces.geometry import Geometry

TICKS_PER_S = 10**12  # the engine keeps time in integer picoseconds so that sums are exact


def to_ticks(seconds: float) -> int:
    return int(round(seconds * TICKS_PER_S))


@dataclass(frozen=True)
class CostModel:
    """Modelled durations (seconds) for one model geometry on one hardware profile."""

    hardware: HardwareSpec
    geometry: Geometry
    cpu: CpuSpec | None = None  # the host's CPU, for policies that compute experts there

    def roofline_s(self, flops: float, nbytes: float) -> float:
        """One kernel: launch cost plus the slower of compute-bound and memory-bound time."""
        hw = self.hardware
        return hw.kernel_launch_s + max(flops / hw.compute_flops_per_s, nbytes / hw.hbm_bytes_per_s)

    def expert_compute_s(self, tokens: int) -> float:
        """One routed expert over `tokens` tokens: read its weights once, in and out activations per token."""
        g = self.geometry
        flops = tokens * g.expert_flops_per_token
        nbytes = g.bytes_per_expert + 2.0 * tokens * g.hidden_size * g.dtype_bytes
        return self.hardware.expert_overhead_s + self.roofline_s(flops, nbytes)

    def dense_layer_s(self, tokens: int, context: int, attention_pairs: int | None = None) -> float:
        """Dense part of one layer (attention, router, shared experts) for `tokens` new tokens.

        `context`: KV-cache entries read (summed over the batch's sequences); `attention_pairs`:
        (query, key) pairs scored, default `context` (one decode token per sequence). The dense
        weights are spread evenly over the layers.
        """
        g = self.geometry
        pairs = context if attention_pairs is None else attention_pairs
        per_layer_weights = g.dense_bytes / g.num_layers
        flops = tokens * g.dense_flops_per_token / g.num_layers + 4.0 * g.hidden_size * pairs
        nbytes = per_layer_weights + context * g.kv_bytes_per_token / g.num_layers
        return self.hardware.layer_overhead_s + self.roofline_s(flops, nbytes)

    def wire_s(self, nbytes: float) -> float:
        """Time the bytes occupy the host-to-device link (shared by all copy engines)."""
        return nbytes / self.hardware.link_bytes_per_s

    def transfer_s(self, nbytes: float) -> float:
        """One uncontended copy: per-transfer latency plus bytes over the link bandwidth."""
        return self.hardware.transfer_latency_s + self.wire_s(nbytes)

    @property
    def expert_load_s(self) -> float:
        return self.transfer_s(self.geometry.bytes_per_expert)

    # --- experts computed on the CPU (docs/cpu-execution.md) ----------------------------------------
    def cpu_expert_s(self, tokens: int) -> float:
        """One routed expert over `tokens` tokens on the CPU: its weights read once from host memory
        or its FLOPs, whichever binds, plus the dispatch cost."""
        cpu = self._cpu()
        g = self.geometry
        flops = tokens * g.expert_flops_per_token
        nbytes = g.bytes_per_expert + 2.0 * tokens * g.hidden_size * g.dtype_bytes
        return cpu.expert_overhead_s + max(flops / cpu.compute_flops_per_s, nbytes / cpu.mem_bytes_per_s)

    def activation_copy_s(self, tokens: int) -> float:
        """One direction of a layer's hand-off to the CPU: `tokens` hidden states (to the CPU before
        its experts, their combined outputs back after), one copy each way."""
        g = self.geometry
        return self.transfer_s(tokens * g.hidden_size * g.dtype_bytes)

    def _cpu(self) -> CpuSpec:
        if self.cpu is None:
            raise ValueError("this cost model has no CPU profile; CPU-executing policies need one (--cpu)")
        return self.cpu
