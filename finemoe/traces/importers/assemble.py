"""Routed sequences read from an engine's log, assembled into a trace (format v1).

The engine formats (vLLM's returned routed experts, SGLang's per-token recorder dump, llama.cpp's
moe-trace CSV, Megatron-LM's router trace) each yield, per request they can tell apart, the top-k
expert ids of every token and layer they logged, in token order, the prompt first. This module
owns what they then share: the checks against the model's geometry, the trace rows (iteration 0 =
the prompt, then one decode iteration per token), missing (token, layer) records and the marks of
what the log lacks. None of these formats carries gate weights, so each present record stores
1/top-k per expert (rank order as the engine wrote it) and the trace says so in `metadata.source`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finemoe.errors import TraceError
from finemoe.traces.geometry import Geometry
from finemoe.traces.schema import LAYERS_LOGGED_KEY, MISSING_EXPERT, RequestInfo, Trace

NO_GATE = "expert ids only: no gate weights (stored as 1/top-k each), no router probabilities"


@dataclass
class RoutedSequence:
    """One request as a log shows it: `experts[t, layer, k]` for its tokens in position order
    (-1 where a (token, layer) was not logged), the first `prompt` of them its prompt."""

    label: str
    prompt: int
    experts: np.ndarray  # int [tokens, num_layers, top_k]


def check_ids(experts: np.ndarray, geometry: Geometry, where: str) -> None:
    """TraceError naming the first expert id outside the model, or a record only partly filled."""
    ids = np.asarray(experts)
    bad = (ids >= geometry.num_experts) | (ids < MISSING_EXPERT)
    if bad.any():
        t, layer, _ = map(int, np.argwhere(bad)[0])
        raise TraceError(f"{where}: token {t} layer {layer} names expert {int(ids[t, layer][bad[t, layer]][0])}, "
                         f"outside 0..{geometry.num_experts - 1} of this model")
    present = (ids >= 0).sum(axis=2)
    partly = (present > 0) & (present < geometry.top_k)
    if partly.any():
        t, layer = map(int, np.argwhere(partly)[0])
        raise TraceError(f"{where}: token {t} layer {layer} lists {int(present[t, layer])} of its "
                         f"{geometry.top_k} experts")


def check_shape(shape: Sequence[int], geometry: Geometry, what: str, where: str) -> None:
    """An array [tokens, layers, top-k] must have the model's layers and top-k."""
    if len(shape) != 3:
        raise TraceError(f"{where}: {what} must be a [tokens, layers, top-k] array, got {len(shape)} dimension(s)")
    if (shape[1], shape[2]) != (geometry.num_layers, geometry.top_k):
        raise TraceError(f"{where}: {what} holds {shape[1]} layers x top-{shape[2]}, but the model has "
                         f"{geometry.num_layers} layers x top-{geometry.top_k}; give the model that wrote it "
                         "(--model-profile or explicit sizes)")


def file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"name": path.name, "sha256": h.hexdigest()}


def build_trace(seqs: Sequence[RoutedSequence], geometry: Geometry, *, kind: str, files: Sequence[Path],
                lacks: str, layers_logged: Sequence[int] | None = None) -> Trace:
    """The trace of `seqs` (request ids in the order given); `lacks` says what the format does not
    record, kept in the trace's metadata beside the gate note."""
    if not seqs:
        raise TraceError(f"{', '.join(str(f) for f in files)}: the log holds no routed tokens")
    L, K = geometry.num_layers, geometry.top_k
    requests, parts = [], []
    for rid, s in enumerate(seqs):
        experts = np.asarray(s.experts, np.int64)
        t_len = experts.shape[0]
        if t_len == 0:
            raise TraceError(f"{s.label}: the log holds no tokens of this request")
        check_ids(experts, geometry, s.label)
        prompt = min(int(s.prompt), t_len)
        n_dec = t_len - prompt
        iteration = np.concatenate([np.zeros(prompt, np.int32), np.arange(1, n_dec + 1, dtype=np.int32)])
        requests.append(RequestInfo(rid, prompt, n_dec + (1 if prompt else 0), prompt > 0, label=s.label))
        weights = np.where(experts >= 0, 1.0 / K, 0.0).astype(np.float16)
        parts.append((np.full(t_len, rid, np.int32), iteration, np.arange(t_len, dtype=np.int32),
                      experts.astype(np.int16), weights))
    meta: dict = {"source": {"kind": kind, "files": [file_digest(Path(f)) for f in files], "gate": NO_GATE,
                             "lacks": lacks}}
    if layers_logged is not None and len(layers_logged) < L:
        meta[LAYERS_LOGGED_KEY] = [int(v) for v in layers_logged]
    return Trace(geometry=geometry, requests=tuple(requests),
                 request_id=np.concatenate([p[0] for p in parts]), iteration=np.concatenate([p[1] for p in parts]),
                 position=np.concatenate([p[2] for p in parts]), experts=np.concatenate([p[3] for p in parts]),
                 weights=np.concatenate([p[4] for p in parts]), metadata=meta)


def logged_layers(seqs: Sequence[RoutedSequence]) -> list[int]:
    """The layers any token of any sequence holds routing for."""
    present = np.zeros(seqs[0].experts.shape[1], bool) if seqs else np.zeros(0, bool)
    for s in seqs:
        present |= (np.asarray(s.experts)[:, :, 0] >= 0).any(axis=0)
    return np.flatnonzero(present).tolist()
