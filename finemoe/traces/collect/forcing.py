"""Run a model with given routing instead of its routers' choice: the check that a trace is exact.

If the recorded experts and weights, forced into a forward pass over the same tokens, give the
logits the model produced while it was being traced, the trace holds what the model really used.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from finemoe.errors import ConfigError
from finemoe.traces.collect.adapters import moe_layers


@contextmanager
def forced_routing(model, experts: np.ndarray, weights: np.ndarray):
    """Within the block, MoE layer l of a one-sequence forward uses experts[:, l] and weights[:, l].

    `experts` and `weights` are [tokens, layers, top_k] in sequence order (as a trace stores a
    request's rows). Works with transformers 5.x routers, which return (logits, weights, experts).
    """
    layers = moe_layers(model)
    if experts.shape[1] != len(layers) or weights.shape != experts.shape:
        raise ConfigError(f"forced routing has shape {experts.shape}, the model has {len(layers)} MoE layers")
    handles = []

    def make(index: int):
        def hook(module, args, output):
            if not isinstance(output, (tuple, list)):
                raise ConfigError("forced routing needs routers that return (logits, weights, experts)")
            logits, w, idx = output[0], output[1], output[2]
            if idx.shape[0] != experts.shape[0]:
                raise ConfigError(f"forward has {idx.shape[0]} tokens, forced routing {experts.shape[0]}")
            new_idx = torch.from_numpy(np.array(experts[:, index], dtype=np.int64)).to(idx.dtype)
            new_w = torch.as_tensor(np.asarray(weights[:, index], dtype=np.float32)).to(w.dtype)
            return (logits, new_w, new_idx, *output[3:])

        return hook

    try:
        for layer in layers:
            handles.append(layer.router.register_forward_hook(make(layer.moe_index)))
        yield
    finally:
        for h in handles:
            h.remove()
