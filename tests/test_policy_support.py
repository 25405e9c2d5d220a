"""Support for the policy tests (no tests here): hand-made traces and a policy context."""

from __future__ import annotations

import numpy as np

from finemoe.policies.base import PolicyContext
from finemoe.traces.schema import RequestInfo, Trace
from finemoe.traces.synthetic import tiny_geometry


def trace_from_probs(probs, keys=None, request_ids=None, iterations=None, spec=None, top_k=2) -> Trace:
    """A trace whose recorded experts are exactly the top-k of the given probability rows.

    probs [n, L, J]; keys [n, D] or None; request_ids/iterations per row (default: one request,
    iterations 0, 1, 2, ...).
    """
    probs = np.asarray(probs, dtype=np.float16)
    n, L, J = probs.shape
    rid = np.zeros(n, np.int32) if request_ids is None else np.asarray(request_ids, np.int32)
    it = np.arange(n, dtype=np.int32) if iterations is None else np.asarray(iterations, np.int32)
    order = np.argsort(-probs.astype(np.float32), axis=2, kind="stable")[:, :, :top_k]
    top = np.take_along_axis(probs.astype(np.float32), order, axis=2)
    weights = top / np.maximum(top.sum(axis=2, keepdims=True), 1e-9)
    requests = []
    for r in sorted(set(rid.tolist())):
        its = it[rid == r]
        requests.append(RequestInfo(r, int((its == 0).sum()), int((its > 0).sum()), bool((its == 0).any())))
    pos = np.zeros(n, np.int32)
    for r in set(rid.tolist()):
        idx = np.flatnonzero(rid == r)
        pos[idx] = np.arange(idx.size)
    return Trace(
        geometry=tiny_geometry(num_layers=L, num_experts=J, top_k=top_k),
        requests=tuple(requests),
        request_id=rid,
        iteration=it,
        position=pos,
        experts=order.astype(np.int16),
        weights=weights.astype(np.float16),
        router_probs=probs,
        semantic_key=None if keys is None else np.asarray(keys, np.float16),
        spec_experts=None if spec is None else np.asarray(spec, np.int16),
        spec_weights=None if spec is None else np.full(np.shape(spec), 0.5, np.float16),
    )


def context(geometry, capacity_slots: int | None = None, seed: int = 0) -> PolicyContext:
    return PolicyContext(
        geometry=geometry,
        capacity_slots=capacity_slots or geometry.num_layers * geometry.num_experts,
        seed=seed,
        is_resident=lambda key: False,
        is_in_flight=lambda key: False,
        expert_load_s=0.01,
    )
