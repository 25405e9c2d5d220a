"""Seeded synthetic traces for tests and benchmarks (never passed off as real data).

Routing follows a per-request "topic" plus a per-layer Markov chain over experts, so that
predictors have structure to find, as in real routing, while aggregate usage stays near balanced.
"""

from __future__ import annotations

import numpy as np

from finemoe.traces.geometry import Geometry
from finemoe.traces.schema import RequestInfo, Trace


def tiny_geometry(num_layers: int = 4, num_experts: int = 8, top_k: int = 2, **overrides) -> Geometry:
    fields = dict(
        model_name=f"synthetic-{num_layers}x{num_experts}",
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        num_shared_experts=0,
        hidden_size=64,
        expert_intermediate_size=128,
        dtype="float32",
        bytes_per_expert=3 * 64 * 128 * 4,
        dense_bytes=1_000_000,
        kv_bytes_per_token=4 * 2 * 64 * 4,
    )
    fields.update(overrides)
    return Geometry(**fields)


def synthetic_trace(
    geometry: Geometry | None = None,
    *,
    num_requests: int = 4,
    prompt_tokens: int | tuple[int, int] = 8,
    generated_tokens: int | tuple[int, int] = 16,
    with_prefill: bool = True,
    with_probs: bool = True,
    semantic_dim: int | None = 16,
    with_spec: bool = True,
    seed: int = 0,
) -> Trace:
    """A valid trace; token counts may be fixed or (low, high) ranges drawn per request.

    `generated_tokens` is the number of decode iterations; with a prefill the request produces one
    more token, as in `RequestInfo.generated_tokens`.
    """
    g = geometry or tiny_geometry()
    rng = np.random.default_rng(seed)
    L, J, K = g.num_layers, g.num_experts, g.top_k
    transition = rng.dirichlet(np.full(J, 0.3), size=(L, J))  # layer l's top-1 -> layer l+1's logits bias
    topics = rng.normal(size=(max(num_requests, 1), J))
    topic_keys = rng.normal(size=(max(num_requests, 1), semantic_dim or 1))

    def draw(spec):
        return int(spec) if isinstance(spec, int) else int(rng.integers(spec[0], spec[1] + 1))

    rows_r, rows_i, rows_p, probs_all = [], [], [], []
    requests = []
    for r in range(num_requests):
        p_len, g_len = draw(prompt_tokens), draw(generated_tokens)
        # generated_tokens: one per recorded iteration (the prefill produces the first token).
        produced = g_len + (1 if with_prefill else 0)
        requests.append(RequestInfo(r, p_len, produced, with_prefill, label=f"synthetic/{r}"))
        iters = ([(0, pos) for pos in range(p_len)] if with_prefill else []) + [
            (i, p_len + i - 1) for i in range(1, g_len + 1)
        ]
        for it, pos in iters:
            logits = np.empty((L, J))
            prev = int(rng.integers(J))
            for layer in range(L):
                logits[layer] = 2.0 * topics[r] + 4.0 * np.log(transition[layer, prev] + 1e-6) + rng.normal(size=J)
                prev = int(np.argmax(logits[layer]))
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs_all.append(p / p.sum(axis=1, keepdims=True))
            rows_r.append(r)
            rows_i.append(it)
            rows_p.append(pos)
    probs = np.asarray(probs_all).reshape(-1, L, J)
    order = np.argsort(-probs, axis=2, kind="stable")[:, :, :K]
    top = np.take_along_axis(probs, order, axis=2)
    weights = top / top.sum(axis=2, keepdims=True)
    n = probs.shape[0]
    spec = None
    if with_spec:
        # The next layer's router on this layer's input: the truth with some noise.
        spec = np.full((n, L, K), -1, dtype=np.int16)
        noisy = probs[:, 1:] + rng.normal(scale=0.05, size=probs[:, 1:].shape)
        spec[:, :-1] = np.argsort(-noisy, axis=2)[:, :, :K]
    return Trace(
        geometry=g,
        requests=tuple(requests),
        request_id=np.asarray(rows_r, dtype=np.int32),
        iteration=np.asarray(rows_i, dtype=np.int32),
        position=np.asarray(rows_p, dtype=np.int32),
        experts=order.astype(np.int16),
        weights=weights.astype(np.float16),
        router_probs=probs.astype(np.float16) if with_probs else None,
        semantic_key=(
            (topic_keys[np.asarray(rows_r)] + rng.normal(scale=0.3, size=(n, semantic_dim))).astype(np.float16)
            if semantic_dim
            else None
        ),
        spec_experts=spec,
        spec_weights=np.full((n, L, K), 1.0 / K, dtype=np.float16) if with_spec else None,
        metadata={"source": {"kind": "synthetic", "seed": seed}},
    )
