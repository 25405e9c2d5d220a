"""Forward hooks that record what a transformers MoE model routed, one model forward at a time.

Hooks sit on the input embedding (the step's input ids and semantic key), on every router (its
returned logits, weights and experts) and, for the speculative router output, on every MoE
decoder layer's input. Nothing in the model is replaced; removing the hooks leaves it untouched.

During generate() a hook only keeps references to tensors the model produced anyway, so the
forward pass pays almost nothing. `finish()` then does the arithmetic once per batch and layer
over all steps together: sorting by weight, the full distribution, the semantic projection, and
the speculative routers (called through `.forward`, so no hook, ours or transformers' own output
recorder, sees those extra calls). One device-to-host copy per field and batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from finemoe.traces.collect.adapters import Architecture, MoELayer, embedding, moe_layers, route


@dataclass
class StepRecord:
    """References to what one model forward computed, for all (batch row, column) positions."""

    input_ids: torch.Tensor  # [B, S]
    embedded: torch.Tensor | None  # [B, S, H]
    router_out: list = field(default_factory=list)  # per MoE layer: the router's return value
    layer_input: list = field(default_factory=list)  # per MoE layer: hidden state entering it


class RoutingRecorder:
    """Installs the hooks; `steps` fills with one StepRecord per forward until `remove()`."""

    def __init__(
        self,
        model,
        arch: Architecture,
        *,
        router_probs: bool = True,
        speculative: bool = True,
        projection: torch.Tensor | None = None,
        semantic: bool = True,
    ) -> None:
        self.model = model
        self.arch = arch
        self.layers: list[MoELayer] = moe_layers(model)
        self.keep_probs = router_probs
        self.speculative = speculative
        self.projection = projection
        self.semantic = semantic
        self.steps: list[StepRecord] = []
        self._handles = []
        self._install()

    def _install(self) -> None:
        self._handles.append(embedding(self.model).register_forward_hook(self._on_embedding))
        for layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(self._on_router))
            if self.speculative and layer.moe_index + 1 < len(self.layers):
                self._handles.append(layer.decoder.register_forward_pre_hook(self._on_layer_input, with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> RoutingRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _on_embedding(self, module, args, output) -> None:
        ids = args[0] if args else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            ids = torch.full(output.shape[:2], -1, dtype=torch.long)
        self.steps.append(StepRecord(input_ids=ids.detach(), embedded=output.detach() if self.semantic else None))

    def _on_router(self, module, args, output) -> None:
        if isinstance(output, (tuple, list)):
            self.steps[-1].router_out.append(tuple(o.detach() for o in output[:3]))
        else:
            self.steps[-1].router_out.append(output.detach())

    def _on_layer_input(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        self.steps[-1].layer_input.append(hidden.detach())

    def finish(self) -> list[dict]:
        """Turn the recorded steps into numpy arrays, one dict per step, and forget them.

        Keys: input_ids [B, S]; experts, weights, spec_experts, spec_weights [B*S, L, K]; probs
        [B*S, L, J]; semantic [B, S, D]. Optional ones are None when not recorded.
        """
        steps, self.steps = self.steps, []
        if not steps:
            return []
        L = len(self.layers)
        for i, step in enumerate(steps):
            if len(step.router_out) != L:
                raise RuntimeError(f"forward {i} ran {len(step.router_out)} of {L} routers")
        sizes = [s.input_ids.numel() for s in steps]
        config = self.model.config
        experts, weights, probs, spec_e, spec_w = [], [], [], [], []
        with torch.no_grad():
            for layer in range(L):
                outs = [s.router_out[layer] for s in steps]
                if isinstance(outs[0], tuple):
                    merged = tuple(torch.cat([o[j].reshape(n, -1) for o, n in zip(outs, sizes, strict=True)])
                                   for j in range(3))
                else:
                    merged = torch.cat([o.reshape(n, -1) for o, n in zip(outs, sizes, strict=True)])
                p, w, e = route(self.arch, config, merged)
                experts.append(e)
                weights.append(w)
                if self.keep_probs:
                    probs.append(p)
                if self.speculative:
                    e2, w2 = self._speculate(steps, layer, e, w)
                    spec_e.append(e2)
                    spec_w.append(w2)
            semantic = None
            if self.semantic:
                semantic = torch.cat([s.embedded.reshape(-1, s.embedded.shape[-1]) for s in steps]).float()
                if self.projection is not None:
                    semantic = semantic @ self.projection.to(semantic.device)

        def host(items, dtype=None):
            if not items:
                return None
            stacked = torch.stack(items, 1)
            stacked = stacked.to(dtype) if dtype is not None else stacked
            return list(torch.split(stacked.cpu(), sizes))

        cols = {
            "experts": host(experts, torch.int16),
            "weights": host(weights, torch.float16),
            "probs": host(probs, torch.float16),
            "spec_experts": host(spec_e, torch.int16),
            "spec_weights": host(spec_w, torch.float16),
        }
        sem = list(torch.split(semantic.half().cpu(), sizes)) if semantic is not None else None
        out = []
        for i, step in enumerate(steps):
            B, S = step.input_ids.shape
            record = {"input_ids": step.input_ids.cpu().numpy()}
            for key, parts in cols.items():
                record[key] = parts[i].numpy() if parts is not None else None
            record["semantic"] = sem[i].reshape(B, S, -1).numpy() if sem is not None else None
            out.append(record)
        return out

    def _speculate(self, steps, layer: int, experts: torch.Tensor, weights: torch.Tensor):
        """Layer l+1's router applied to the hidden state entering layer l, through l+1's norm."""
        if layer + 1 >= len(self.layers):
            return torch.full_like(experts, -1), torch.zeros_like(weights)
        nxt = self.layers[layer + 1]
        hidden = torch.cat([s.layer_input[layer].reshape(-1, s.layer_input[layer].shape[-1]) for s in steps])
        _, w, e = route(self.arch, self.model.config, nxt.router.forward(nxt.norm.forward(hidden)))
        return e, w
