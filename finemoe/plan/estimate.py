"""Closed-form time of a placement over the measured accesses, from the cost model's own terms
(sim/costs.py), for the plan's curve: no events, no queues, one vector pass per strategy and budget.

Per layer-step (dense part, then the routed experts, as in docs/timing-model.md):
  * experts resident on the GPU compute back to back;
  * copied experts (on-demand misses) cross the link one after another while the resident ones
    compute (with two or more copy engines one copy's latency overlaps the last one's bytes), and
    each computes once it has landed and the GPU is free;
  * experts on the CPU run beside the GPU's: a hand-off each way, the experts back to back, a sync;
    the layer ends when both sides have: dense + max(GPU side, CPU side).
A request's TTFT is the time of every step before its first plus that step (batch 1, all arriving at
once: requests run one after another); its TPOT is the mean of its later steps. The simulator is the
reference: the plan confirms the points near the front with it and prints which numbers are which.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finemoe.plan.accesses import Accesses
from finemoe.sim.costs import CostModel

GPU, COPY, CPU = 0, 1, 2  # where an access's expert runs


@dataclass(frozen=True)
class Estimate:
    ttft_p50_s: float
    tpot_p50_s: float
    prefill_step_s: float  # mean time of a request's first step
    decode_step_s: float  # mean time of the other steps
    loads: int  # experts copied to the GPU
    ran_gpu_resident: int
    ran_gpu_copied: int
    ran_cpu: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _per_tokens(fn, tokens: np.ndarray) -> np.ndarray:
    """fn(t) for each access's token count, computed once per distinct count."""
    values, inverse = np.unique(tokens, return_inverse=True)
    return np.array([fn(int(t)) for t in values])[inverse]


class Estimator:
    """The closed form over one trace's accesses: the terms that do not depend on the placement
    (compute per access, hand-offs and dense time per step) are computed once, so a plan's hundreds
    of (strategy, budget) estimates each cost a few vector operations."""

    def __init__(self, acc: Accesses, costs: CostModel) -> None:
        self.acc, self.costs = acc, costs
        L = acc.num_layers
        self.groups = acc.step * L + acc.layer
        self.size = acc.num_steps * L
        self.gpu_s = _per_tokens(costs.expert_compute_s, acc.tokens)
        self.cpu_s = _per_tokens(costs.cpu_expert_s, acc.tokens) if costs.cpu is not None else None
        self.hand_off = (np.repeat([2 * costs.activation_copy_s(int(t)) + costs.cpu.sync_s for t in acc.step_tokens], L)
                         if costs.cpu is not None else None)
        self.dense_s = L * np.array([costs.dense_layer_s(int(t), int(c), int(p)) for t, c, p
                                     in zip(acc.step_tokens, acc.step_context, acc.step_pairs, strict=True)])

    def __call__(self, where: np.ndarray) -> Estimate:
        """The estimate when each access runs where `where` (GPU, COPY or CPU per access) says."""
        acc, costs, groups, size = self.acc, self.costs, self.groups, self.size
        resident = np.bincount(groups, weights=np.where(where == GPU, self.gpu_s, 0.0), minlength=size)
        copied = np.bincount(groups, weights=np.where(where == COPY, self.gpu_s, 0.0), minlength=size)
        n = np.bincount(groups, weights=(where == COPY).astype(float), minlength=size)
        hw = costs.hardware
        first = costs.expert_load_s  # the first copy lands after its latency and its bytes
        wire = costs.wire_s(costs.geometry.bytes_per_expert)
        step = wire if hw.copy_engines > 1 else first  # each later one, one wire time apart (or a whole copy)
        last_lands = first + np.maximum(n - 1, 0) * step
        mean_copied = np.divide(copied, n, out=np.zeros(size), where=n > 0)
        # the GPU runs the resident experts, then each copied one once it has landed
        gpu_side = np.where(n > 0, np.maximum.reduce([resident + copied, last_lands + mean_copied, first + copied]),
                            resident) + n * hw.miss_overhead_s
        cpu_side = np.zeros(size)
        on_cpu = where == CPU
        if on_cpu.any():
            if self.cpu_s is None:
                raise ValueError("a placement with experts on the CPU needs a cost model with a CPU")
            work = np.bincount(groups, weights=np.where(on_cpu, self.cpu_s, 0.0), minlength=size)
            used = np.bincount(groups, weights=on_cpu.astype(float), minlength=size) > 0
            cpu_side = np.where(used, work + self.hand_off, 0.0)
        step_s = self.dense_s + np.maximum(gpu_side, cpu_side).reshape(acc.num_steps, acc.num_layers).sum(axis=1)
        return _latencies(acc, step_s, where)


def estimate(acc: Accesses, costs: CostModel, where: np.ndarray) -> Estimate:
    """The estimate when each access runs where `where` (GPU, COPY or CPU per access) says."""
    return Estimator(acc, costs)(where)


def _latencies(acc: Accesses, step_s: np.ndarray, where: np.ndarray) -> Estimate:
    ends = np.cumsum(step_s)
    ttft, tpot = [], []
    for rid in dict.fromkeys(acc.step_request.tolist()):
        steps = np.flatnonzero(acc.step_request == rid)
        first = steps[0]
        ttft.append(ends[first])
        if len(steps) > 1:
            tpot.append(float(step_s[steps[1:]].mean()))
    first = acc.step_first
    return Estimate(
        ttft_p50_s=float(np.median(ttft)) if ttft else float("nan"),
        tpot_p50_s=float(np.median(tpot)) if tpot else float("nan"),
        prefill_step_s=float(step_s[first].mean()) if first.any() else float("nan"),
        decode_step_s=float(step_s[~first].mean()) if (~first).any() else float("nan"),
        loads=int((where == COPY).sum()),
        ran_gpu_resident=int((where == GPU).sum()),
        ran_gpu_copied=int((where == COPY).sum()),
        ran_cpu=int((where == CPU).sum()),
    )
