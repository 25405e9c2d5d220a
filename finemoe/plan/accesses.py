"""The expert accesses of the measured requests, in the order a batch-1 run makes them: request after
request (in the split's order), iteration after iteration, layer after layer, each layer-step's experts
(the union over the iteration's tokens) as the engine lists them, with the tokens each expert computes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finemoe.sim.engine import iter_info
from finemoe.traces.schema import Trace


@dataclass(frozen=True)
class Accesses:
    key: np.ndarray  # int64 [a]: layer * J + expert
    layer: np.ndarray  # int64 [a]
    step: np.ndarray  # int64 [a]: index into the step arrays below
    tokens: np.ndarray  # int64 [a]: the step's tokens routed to this expert
    step_request: np.ndarray  # int64 [s]
    step_first: np.ndarray  # bool [s]: the request's first step (its time counts in TTFT)
    step_tokens: np.ndarray  # int64 [s]: tokens the step processes
    step_context: np.ndarray  # int64 [s]: KV entries read
    step_pairs: np.ndarray  # int64 [s]: (query, key) pairs scored
    num_layers: int
    num_experts: int

    @property
    def num_steps(self) -> int:
        return len(self.step_tokens)


def measured_accesses(trace: Trace, request_ids: list[int]) -> Accesses:
    g = trace.geometry
    L, J = g.num_layers, g.num_experts
    keys, layers, steps, tokens = [], [], [], []
    s_req, s_first, s_tok, s_ctx, s_pairs = [], [], [], [], []
    by_req = trace.iterations_by_request
    for rid in request_ids:
        for n, it in enumerate(by_req.get(rid, ())):
            step = len(s_tok)
            info = iter_info(trace, it.start, it.stop)  # what the engine computes for this step
            for layer, items in enumerate(info.layers):
                for e, c in items:
                    keys.append(layer * J + e)
                    layers.append(layer)
                    steps.append(step)
                    tokens.append(c)
            s_req.append(rid)
            s_first.append(n == 0)
            s_tok.append(info.tokens)
            s_ctx.append(info.context)
            s_pairs.append(info.pairs)

    def ints(values):
        return np.asarray(values, dtype=np.int64)

    return Accesses(ints(keys), ints(layers), ints(steps), ints(tokens), ints(s_req), np.asarray(s_first, dtype=bool),
                    ints(s_tok), ints(s_ctx), ints(s_pairs), L, J)
