"""Where a replay's weights live: every expert once in (pinned) host memory, and the dense part.

Host experts are one tensor [layers, experts, 3 * hidden * intermediate] allocated once, pinned
when copies go to a CUDA device, filled either with seeded random values of the right dtype or with
a real checkpoint's experts. The geometry may be scaled down (`scale_geometry`) so that a model's
experts fit a small machine's RAM; the scale is recorded and the simulator is given the same
scaled geometry, so the comparison stays like for like.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from finemoe.errors import ConfigError
from finemoe.replay.compute import ExpertShape, dense_columns
from finemoe.replay.device import host_available_bytes, torch_dtype
from finemoe.traces.geometry import DTYPE_BYTES, Geometry

GB = 10**9


def scale_geometry(geometry: Geometry, factor: float, dtype: str | None = None) -> Geometry:
    """The geometry with hidden and intermediate sizes times `factor` (and optionally another dtype).

    Expert bytes follow the new shapes exactly (3 x hidden x intermediate x dtype bytes); dense
    weights scale with factor^2 (attention and projections are hidden x hidden), KV bytes per token
    with factor (they are hidden-wide).
    """
    if not factor > 0:
        raise ConfigError(f"--expert-scale must be positive, got {factor}")
    dtype = dtype or geometry.dtype
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    if factor == 1.0 and dtype == geometry.dtype:
        return geometry
    h = max(1, int(round(geometry.hidden_size * factor)))
    i = max(1, int(round(geometry.expert_intermediate_size * factor)))
    ratio = DTYPE_BYTES[dtype] / geometry.dtype_bytes
    name = geometry.model_name + (f"@x{factor:g}" if factor != 1.0 else "") + (f"-{dtype}" if dtype != geometry.dtype else "")
    return replace(
        geometry,
        model_name=name,
        hidden_size=h,
        expert_intermediate_size=i,
        dtype=dtype,
        bytes_per_expert=int(round(3 * h * i * DTYPE_BYTES[dtype])),
        dense_bytes=int(round(geometry.dense_bytes * factor**2 * ratio)),
        kv_bytes_per_token=int(round(geometry.kv_bytes_per_token * factor * ratio)),
    )


def expert_shape(geometry: Geometry) -> ExpertShape:
    return ExpertShape(geometry.hidden_size, geometry.expert_intermediate_size)


def replay_bytes(geometry: Geometry, slots: int, on_cuda: bool) -> dict[str, int]:
    """Host (and, on CPU, "device") bytes a replay allocates, to check them against free RAM."""
    elem = DTYPE_BYTES[geometry.dtype]
    experts = int(geometry.num_layers * geometry.num_experts * expert_shape(geometry).numel * elem)
    pool = int(slots * expert_shape(geometry).numel * elem)
    dense = int(geometry.num_layers * geometry.hidden_size
                * dense_columns(geometry.dense_bytes, geometry.num_layers, geometry.hidden_size, elem) * elem)
    out = {"host_experts": experts}
    if not on_cuda:
        out["device_slots"] = pool
        out["dense"] = dense
    return out


def check_host_memory(geometry: Geometry, slots: int, on_cuda: bool, available: int | None = None) -> None:
    """A clear error when the replay's buffers would not fit the free host memory (80% of it)."""
    need = replay_bytes(geometry, slots, on_cuda)
    total = sum(need.values())
    free = host_available_bytes() if available is None else available
    if total > 0.8 * free:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / GB:.2f} GB" for k, v in need.items())
        per = geometry.bytes_per_expert
        fit = (0.8 * free / max(total, 1)) ** 0.5
        raise ConfigError(
            f"replaying {geometry.model_name} needs {total / GB:.2f} GB of host memory ({parts}; "
            f"{geometry.num_layers} x {geometry.num_experts} experts of {per / 1e6:.1f} MB) but only "
            f"{free / GB:.2f} GB is free; pass a smaller --model-profile or --expert-scale {fit * 0.9:.3g} "
            "(or less) to shrink the experts"
        )


class HostExperts:
    """All experts of the model in host memory: `weights[layer, expert]` is one flat expert buffer."""

    def __init__(self, geometry: Geometry, *, pinned: bool, seed: int = 0) -> None:
        import torch

        self.geometry = geometry
        self.shape = expert_shape(geometry)
        self.dtype = torch_dtype(geometry.dtype)
        L, E = geometry.num_layers, geometry.num_experts
        self.weights = torch.empty((L, E, self.shape.numel), dtype=self.dtype, pin_memory=pinned)
        self.pinned = pinned
        self.source = "random"
        gen = torch.Generator().manual_seed(seed)
        std = self.shape.hidden_size ** -0.5
        for layer in range(L):  # layer by layer: a float32 staging buffer of the whole model could exceed RAM
            self.weights[layer].copy_(torch.randn((E, self.shape.numel), generator=gen) * std)

    @property
    def nbytes(self) -> int:
        return self.weights.numel() * self.weights.element_size()

    def expert(self, layer: int, expert: int) -> Any:
        return self.weights[layer, expert]

    def load_checkpoint(self, path: str | Path) -> None:
        """Real expert weights from a checkpoint (`state_dict` of torch tensors).

        Keys are matched by the pattern `...layers.{l}...experts.{e}.{w1|gate|gate_proj|w3|up|up_proj|w2|down|down_proj}.weight`.
        """
        import re

        import torch

        path = Path(path)
        files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pt")) + sorted(path.glob("*.bin")) \
            if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise ConfigError(f"--weights {path}: no checkpoint file (.safetensors, .pt or .bin) found")
        state: dict[str, Any] = {}
        for f in files:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(f)))
            else:
                try:
                    obj = torch.load(f, map_location="cpu", weights_only=True)
                except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
                    raise ConfigError(f"--weights {f}: not a readable torch checkpoint ({exc})") from None
                state.update(obj.get("model", obj) if isinstance(obj, dict) else {})
        pat = re.compile(r"layers?\.(\d+)\..*experts\.(\d+)\.(w1|gate|gate_proj|w3|up|up_proj|w2|down|down_proj)\.weight$")
        fused = re.compile(r"layers?\.(\d+)\..*experts\.(gate_up_proj|down_proj)$")  # transformers 5 in memory
        part_of = {"w1": 0, "gate": 0, "gate_proj": 0, "w3": 1, "up": 1, "up_proj": 1, "w2": 2, "down": 2, "down_proj": 2}
        h, i = self.shape.hidden_size, self.shape.intermediate_size
        n = h * i
        found = set()

        def put(key: str, layer: int, expert: int, part: int, tensor) -> None:
            if layer >= self.geometry.num_layers or expert >= self.geometry.num_experts:
                return
            want = (i, h) if part < 2 else (h, i)
            if tuple(tensor.shape) != want:
                raise ConfigError(
                    f"--weights {path}: {key} has shape {tuple(tensor.shape)}, but the trace's geometry "
                    f"needs {want} (was the trace collected from this checkpoint?)"
                )
            self.weights[layer, expert, part * n : (part + 1) * n].copy_(tensor.reshape(-1).to(self.dtype))
            found.add((layer, expert, part))

        for key, tensor in state.items():
            m = pat.search(key)
            if m:
                put(key, int(m.group(1)), int(m.group(2)), part_of[m.group(3)], tensor)
                continue
            m = fused.search(key)
            if m and tensor.dim() == 3:
                layer = int(m.group(1))
                for e in range(tensor.shape[0]):
                    if m.group(2) == "gate_up_proj":
                        put(key, layer, e, 0, tensor[e, : tensor.shape[1] // 2])
                        put(key, layer, e, 1, tensor[e, tensor.shape[1] // 2 :])
                    else:
                        put(key, layer, e, 2, tensor[e])
        expected = self.geometry.num_layers * self.geometry.num_experts * 3
        if len(found) != expected:
            raise ConfigError(
                f"--weights {path}: found {len(found)} of {expected} expert matrices "
                f"({self.geometry.num_layers} layers x {self.geometry.num_experts} experts x gate/up/down)"
            )
        self.source = str(path)


class DenseWeights:
    """One [hidden, columns] matrix per layer holding that layer's share of the dense bytes, and a
    KV cache per layer that attention reads (allocated once, on the device)."""

    def __init__(self, geometry: Geometry, device: str, kv_tokens: int, seed: int = 0) -> None:
        import torch

        g = geometry
        self.dtype = torch_dtype(g.dtype)
        elem = DTYPE_BYTES[g.dtype]
        self.columns = dense_columns(g.dense_bytes, g.num_layers, g.hidden_size, elem)
        gen = torch.Generator().manual_seed(seed + 1)
        std = g.hidden_size ** -0.5
        self.layers = [
            (torch.randn((g.hidden_size, self.columns), generator=gen) * std).to(device=device, dtype=self.dtype)
            for _ in range(g.num_layers)
        ]
        # K and V of one layer for one token: kv_bytes_per_token / layers / 2, in elements.
        self.kv_width = max(1, int(round(g.kv_bytes_per_token / g.num_layers / 2 / elem)))
        self.kv_tokens = max(1, kv_tokens)
        self.kv = [
            torch.zeros((2, self.kv_tokens, self.kv_width), dtype=self.dtype, device=device)
            for _ in range(g.num_layers)
        ]
