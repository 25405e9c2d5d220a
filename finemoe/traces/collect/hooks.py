"""Forward hooks that record what a transformers MoE model routed, one model forward at a time.

Hooks sit on the input embedding (the step's input ids and semantic key), on every router (its
returned experts and weights, and the full distribution) and, for the speculative router output,
on every MoE decoder layer's input. Nothing in the model is replaced; removing the hooks leaves it
untouched. Speculative routers are called through `.forward` so no hook (ours or transformers'
own output recorder) sees those extra calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from finemoe.traces.collect.adapters import Architecture, MoELayer, embedding, moe_layers, route


@dataclass
class StepRecord:
    """Everything one model forward routed, for all (batch row, column) positions, padding included."""

    input_ids: torch.Tensor  # [B, S]
    semantic: torch.Tensor | None  # [B, S, D]
    experts: list[torch.Tensor] = field(default_factory=list)  # per layer [B*S, K]
    weights: list[torch.Tensor] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)  # per layer [B*S, J]
    spec_experts: list[torch.Tensor | None] = field(default_factory=list)
    spec_weights: list[torch.Tensor | None] = field(default_factory=list)

    def to_numpy(self) -> dict:
        """Per-layer lists stacked to [B*S, L, ...] numpy arrays; one device-to-host copy per field.

        Hooks keep tensors where the model runs, so a GPU never waits on a copy mid-forward.
        """
        def stack(items):
            return torch.stack(items, 1).cpu().numpy() if items else None

        out = {
            "input_ids": self.input_ids.cpu().numpy(),
            "semantic": self.semantic.cpu().float().numpy() if self.semantic is not None else None,
            "experts": stack(self.experts),
            "weights": stack(self.weights),
            "probs": stack(self.probs),
        }
        if self.spec_experts:
            ref_e, ref_w = self.experts[0], self.weights[0]
            out["spec_experts"] = stack([
                e if e is not None else torch.full_like(ref_e, -1) for e in self.spec_experts
            ])
            out["spec_weights"] = stack([
                w if w is not None else torch.zeros_like(ref_w) for w in self.spec_weights
            ])
        else:
            out["spec_experts"] = out["spec_weights"] = None
        return out


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
            self._handles.append(layer.router.register_forward_hook(self._router_hook(layer.moe_index)))
            if self.speculative and layer.moe_index + 1 < len(self.layers):
                nxt = self.layers[layer.moe_index + 1]
                self._handles.append(layer.decoder.register_forward_pre_hook(self._spec_hook(nxt), with_kwargs=True))

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
        semantic = None
        if self.semantic:
            semantic = output.detach().float()
            if self.projection is not None:
                semantic = semantic @ self.projection.to(semantic.device)
            semantic = semantic.half()  # what the trace stores; halves the memory held until the batch ends
        self.steps.append(StepRecord(input_ids=ids.detach(), semantic=semantic))

    def _router_hook(self, index: int):
        def hook(module, args, output) -> None:
            probs, weights, experts = route(self.arch, self.model.config, output)
            step = self.steps[-1]
            if len(step.experts) != index:
                raise RuntimeError(f"router {index} ran out of order (recorded {len(step.experts)} layers)")
            step.experts.append(experts.detach())
            step.weights.append(weights.detach())
            if self.keep_probs:
                step.probs.append(probs.detach())
            if self.speculative and len(step.spec_experts) < len(step.experts):
                step.spec_experts.append(None)  # no later MoE layer to speculate for
                step.spec_weights.append(None)

        return hook

    def _spec_hook(self, nxt: MoELayer):
        """Layer l+1's router applied to the hidden state entering layer l, through l+1's norm."""

        def hook(module, args, kwargs) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            with torch.no_grad():
                flat = hidden.reshape(-1, hidden.shape[-1])
                out = nxt.router.forward(nxt.norm.forward(flat))
                _, weights, experts = route(self.arch, self.model.config, out)
            step = self.steps[-1]
            step.spec_experts.append(experts.detach())
            step.spec_weights.append(weights.detach())

        return hook
