"""Prediction quality without timing: what a policy would prefetch for each (step, layer) vs what was routed.

The policy is driven through the same interface calls an engine makes (bind, fit, step start, layer
routed, accesses, request finished), one measured request at a time (batch 1), with no cache and no
clock: every prefetch it asks for counts as a prediction for its (step, layer), whenever it was
issued before that layer's gate ran. This separates the predictor from the scheduling and the cache.

precision = predicted and routed / predicted; recall = predicted and routed / routed (micro
averages over all steps of a layer). Shared experts are not in traces, so they never count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from finemoe.errors import ConfigError
from finemoe.policies.base import LayerRouting, PolicyContext, Sequence, StepInfo
from finemoe.policies.registry import make_policy
from finemoe.policies.support import check_support
from finemoe.traces.schema import Trace

PER_LAYER_COLUMNS = ("policy", "layer", "steps", "routed", "predicted", "correct", "precision", "recall")


@dataclass
class PredictionReport:
    """Per-layer precision/recall of one policy on the measured split, plus totals and the setup."""

    policy: str
    per_layer: pd.DataFrame
    totals: dict
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "config": self.config,
            "totals": {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in self.totals.items()},
            "per_layer": [
                {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
                for row in self.per_layer.to_dict(orient="records")
            ],
        }


def split_request_ids(
    trace: Trace, history_fraction: float, seed: int, *, online: bool = False, max_requests: int | None = None
) -> tuple[list[int], list[int]]:
    """(history, measure) request ids: the simulator's own split, so `predict` and `simulate` measure
    the same requests for the same seed, fraction and trace."""
    from finemoe.sim.config import WorkloadConfig
    from finemoe.sim.workload import split_requests

    workload = WorkloadConfig(history_fraction=history_fraction, online=online, max_requests=max_requests)
    split = split_requests(trace, workload, seed)
    return list(split.history), list(split.measure)


def evaluate_predictions(
    trace: Trace,
    policy_name: str,
    policy_params: dict | None = None,
    *,
    history_fraction: float = 0.7,
    online: bool = False,
    seed: int = 0,
    max_requests: int | None = None,
) -> PredictionReport:
    """Drive one policy over the measured split of `trace` and score its predictions per layer."""
    policy = make_policy(policy_name, **(policy_params or {}))
    hist_ids, meas_ids = split_request_ids(
        trace, history_fraction, seed, online=online, max_requests=max_requests
    )
    report = score_policy(policy, trace, hist_ids, meas_ids, seed=seed)
    report.config.update(history_fraction=history_fraction, online=online)
    return report


def score_policy(policy, trace: Trace, hist_ids, meas_ids, *, seed: int = 0) -> PredictionReport:
    """Bind `policy`, fit it on `hist_ids`, replay `meas_ids` one request at a time and score it."""
    if policy.is_oracle:
        raise ConfigError(f"policy {policy.name} is an oracle: its predictions are the trace itself")
    check_support(policy, trace)
    policy_name = policy.name
    hist_ids, meas_ids = [int(r) for r in hist_ids], [int(r) for r in meas_ids]
    g = trace.geometry
    L, J = g.num_layers, g.num_experts
    policy.bind(
        PolicyContext(
            geometry=g,
            capacity_slots=L * J,
            seed=seed,
            is_resident=lambda key: False,
            is_in_flight=lambda key: False,
            expert_load_s=0.0,
        )
    )
    t0 = time.perf_counter()
    if hist_ids:
        policy.fit(trace.select_requests(hist_ids))
    fit_s = time.perf_counter() - t0

    routed = np.zeros(L, dtype=np.int64)
    predicted = np.zeros(L, dtype=np.int64)
    correct = np.zeros(L, dtype=np.int64)
    steps = np.zeros(L, dtype=np.int64)
    step_no = 0
    t0 = time.perf_counter()
    by_request = trace.iterations_by_request
    for rid in meas_ids:
        for it in by_request.get(rid, ()):
            step = StepInfo(step_no, 0.0, (Sequence(it.request_id, it.iteration, it.start, it.stop),), trace)
            pending: dict[int, set[int]] = {}  # layer -> predicted experts for this step

            def note(prefetches, _pending=pending, _step=step_no):
                for p in prefetches or ():
                    if p.step == _step:
                        _pending.setdefault(p.layer, set()).add(p.expert)

            note(policy.on_step_start(step))
            for layer in range(L):
                routing = LayerRouting(step, layer, 0.0, trace)
                needed = routing.needed()
                pred = pending.pop(layer, set())
                if needed:
                    steps[layer] += 1
                    routed[layer] += len(needed)
                    predicted[layer] += len(pred)
                    correct[layer] += len(pred & needed.keys())
                note(policy.on_layer_routed(routing))
                for e in sorted(needed):
                    policy.on_access(layer, e, e in pred, 0.0)
            step_no += 1
        policy.on_request_finished(rid, trace)
    run_s = time.perf_counter() - t0

    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, correct / np.maximum(predicted, 1), np.nan)
        recall = np.where(routed > 0, correct / np.maximum(routed, 1), np.nan)
    per_layer = pd.DataFrame(
        {
            "policy": policy_name,
            "layer": np.arange(L),
            "steps": steps,
            "routed": routed,
            "predicted": predicted,
            "correct": correct,
            "precision": precision,
            "recall": recall,
        },
        columns=list(PER_LAYER_COLUMNS),
    )
    tot_pred, tot_routed, tot_correct = int(predicted.sum()), int(routed.sum()), int(correct.sum())
    totals = {
        "steps": int(step_no),
        "routed": tot_routed,
        "predicted": tot_pred,
        "correct": tot_correct,
        "precision": tot_correct / tot_pred if tot_pred else float("nan"),
        "recall": tot_correct / tot_routed if tot_routed else float("nan"),
        "predicted_per_layer_step": tot_pred / max(int(steps.sum()), 1),
        "fit_s": fit_s,
        "run_s": run_s,
    }
    config = {
        "trace_hash": trace.content_hash(),
        "model": g.model_name,
        "policy": policy.describe(),
        "seed": seed,
        "history_requests": hist_ids,
        "measured_requests": meas_ids,
    }
    return PredictionReport(policy_name, per_layer, totals, config)
