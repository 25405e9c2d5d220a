"""Import the `route_trace v1` CSV of a mobile llama.cpp-derived engine (../shared/traces/qwen3-30b-a3b-route).

The file, as that engine writes it:

    # route_trace v1
    # model=PATH arch=qwen3moe n_layer=48 n_expert=128 n_expert_used=6
    # layer=0 expert_bytes=3059712 dense_bytes=11953152        (one line per layer)
    turn,phase,step,layer,slot,expert,weight,residency,expert_bytes
    0,0,0,0,0,49,0.221297,0,3059712

One row per routed expert: `turn` the request, `phase` 0 = prefill and 1 = decode, `step` the token's
position (prefill 0..P-1, then one decode token per step), `slot` the rank in the token's top-k,
`residency` 1 when the expert was already in the engine's own expert cache at that access, and
`expert_bytes` what that access loaded (0 when nothing was copied). The geometry comes from the
header; experts of different layers differ in size (mixed quantisation), so the trace's
`bytes_per_expert` is their mean and the per-layer sizes are kept in the metadata. The engine's
residency bits are kept (`metadata.engine_cache`) so the simulator can be set beside a real cache.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finemoe.errors import ConfigError, TraceError
from finemoe.traces.geometry import Geometry
from finemoe.traces.schema import MISSING_EXPERT, RequestInfo, Trace

MAGIC = "# route_trace v1"
COLUMNS = ("turn", "phase", "step", "layer", "slot", "expert", "weight", "residency", "expert_bytes")
ENGINE_CACHE_KEY = "engine_cache"


def sniff(path: Path) -> bool:
    """Whether the file starts like a route_trace v1 CSV."""
    try:
        with open(path, "rb") as fh:
            return fh.readline().strip() == MAGIC.encode()
    except OSError:
        return False


@dataclass
class RouteHeader:
    arch: str
    model: str
    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: list[int]  # per layer
    dense_bytes: list[int]
    header_lines: int


def _kv(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line[1:].split() if "=" in part)


def read_header(path: Path) -> RouteHeader:
    lines = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            lines.append(line.rstrip("\n"))
    if not lines or lines[0].strip() != MAGIC:
        raise TraceError(f"{path}: not a route_trace v1 file (its first line is not {MAGIC!r})")
    model = next((_kv(x) for x in lines if "n_layer=" in x), None)
    if model is None:
        raise TraceError(f"{path}: the header lacks the model line (n_layer=, n_expert=, n_expert_used=)")
    try:
        L, J, K = int(model["n_layer"]), int(model["n_expert"]), int(model["n_expert_used"])
    except (KeyError, ValueError):
        raise TraceError(f"{path}: the header's model line needs whole numbers n_layer, n_expert, n_expert_used") from None
    eb, db = [0] * L, [0] * L
    seen = set()
    for x in lines:
        d = _kv(x)
        if "layer" in d and "expert_bytes" in d:
            try:
                layer = int(d["layer"])
                eb[layer], db[layer] = int(d["expert_bytes"]), int(d.get("dense_bytes", 0))
            except (ValueError, IndexError):
                raise TraceError(f"{path}: bad per-layer header line {x!r}") from None
            seen.add(layer)
    if len(seen) != L:
        raise TraceError(f"{path}: the header gives expert_bytes for {len(seen)} of {L} layers")
    return RouteHeader(model.get("arch", "?"), model.get("model", "?"), L, J, K, eb, db, len(lines))


def import_route_trace(path: str | Path, *, hidden_size: int, expert_intermediate_size: int,
                       engine_cache_bytes: int | None = None, dtype: str = "int4") -> Trace:
    """One route_trace v1 file as a trace; the engine's residency per access kept beside it."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such routing log")
    head = read_header(path)
    L, J, K = head.num_layers, head.num_experts, head.top_k
    try:
        table = pcsv.read_csv(path, read_options=pcsv.ReadOptions(skip_rows=head.header_lines),
                              convert_options=pcsv.ConvertOptions(column_types={
                                  c: (pa.float64() if c == "weight" else pa.int64()) for c in COLUMNS}))
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"{path}: cannot read the CSV rows ({str(exc).strip().splitlines()[0]})") from None
    absent = [c for c in COLUMNS if c not in table.column_names]
    if absent:
        raise TraceError(f"{path}: the CSV lacks column(s) {', '.join(absent)}")
    if table.num_rows == 0:
        raise TraceError(f"{path}: file holds no rows")
    col = {c: table.column(c).to_numpy() for c in COLUMNS}
    for c in COLUMNS:
        if table.column(c).null_count:
            raise TraceError(f"{path}: column {c!r} has empty values")
    line = head.header_lines + 2 + np.arange(table.num_rows)  # file line of each row (header row included)

    def fail(mask: np.ndarray, what: str) -> None:
        bad = np.flatnonzero(mask)
        if bad.size:
            raise TraceError(f"{path}: line {int(line[bad[0]])} {what} ({bad.size} such rows)")

    fail((col["layer"] < 0) | (col["layer"] >= L), f"names a layer outside 0..{L - 1}")
    fail((col["expert"] < 0) | (col["expert"] >= J), f"names an expert outside 0..{J - 1}")
    fail((col["slot"] < 0) | (col["slot"] >= K), f"names a slot outside 0..{K - 1}")
    fail(~np.isin(col["phase"], (0, 1)), "has a phase other than 0 (prefill) or 1 (decode)")
    fail(~np.isin(col["residency"], (0, 1)), "has a residency other than 0 or 1")
    fail(~np.isfinite(col["weight"]) | (col["weight"] < 0), "has a negative or non-finite weight")
    fail((col["step"] < 0) | (col["turn"] < 0), "has a negative step or turn")

    turns = np.unique(col["turn"])
    requests, parts = [], []
    hits = {"prefill": 0, "decode": 0}
    accesses = {"prefill": 0, "decode": 0}
    for rid, turn in enumerate(turns):
        sel = np.flatnonzero(col["turn"] == turn)
        phase, step = col["phase"][sel], col["step"][sel]
        prompt = int(step[phase == 0].max()) + 1 if (phase == 0).any() else 0
        fail(np.isin(col["turn"], [turn]) & (col["phase"] == 1) & (col["step"] < prompt),
             f"is a decode row at a step inside the prompt of turn {int(turn)} ({prompt} prefill steps)")
        fail(np.isin(col["turn"], [turn]) & (col["phase"] == 0) & (col["step"] >= prompt), "is out of order")
        t_len = int(step.max()) + 1
        experts = np.full((t_len, L, K), MISSING_EXPERT, np.int16)
        weights = np.zeros((t_len, L, K), np.float16)
        resid = np.zeros((t_len, L, K), np.int8)
        cell = (step * L + col["layer"][sel]) * K + col["slot"][sel]
        u, counts = np.unique(cell, return_counts=True)
        fail(np.isin(np.arange(table.num_rows), sel[np.isin(cell, u[counts > 1])]),
             "repeats a (step, layer, slot) of its turn")
        experts.reshape(-1)[cell] = col["expert"][sel]
        weights.reshape(-1)[cell] = col["weight"][sel]
        resid.reshape(-1)[cell] = col["residency"][sel]
        filled = (experts >= 0).sum(axis=2)
        if ((filled > 0) & (filled < K)).any():
            s, layer = map(int, np.argwhere((filled > 0) & (filled < K))[0])
            raise TraceError(f"{path}: turn {int(turn)} step {s} layer {layer} lists {int(filled[s, layer])} "
                             f"of its {K} slots")
        # the schema orders a record's experts by descending weight; residency follows them
        order = np.argsort(-weights.astype(np.float32), axis=2, kind="stable")
        experts, weights, resid = (np.take_along_axis(a, order, axis=2) for a in (experts, weights, resid))
        for name, mask in (("prefill", phase == 0), ("decode", phase == 1)):
            hits[name] += int(col["residency"][sel][mask].sum())
            accesses[name] += int(mask.sum())
        n_dec = t_len - prompt
        iteration = np.concatenate([np.zeros(prompt, np.int32), np.arange(1, n_dec + 1, dtype=np.int32)])
        requests.append(RequestInfo(rid, prompt, n_dec + (1 if prompt else 0), prompt > 0, label=f"turn/{int(turn)}"))
        parts.append((np.full(t_len, rid, np.int32), iteration, np.arange(t_len, dtype=np.int32), experts, weights, resid))
    mean_bytes = int(round(float(np.mean(head.expert_bytes))))
    geometry = Geometry(model_name=f"{head.arch}-{L}x{J}-top{K}", num_layers=L, num_experts=J, top_k=K,
                        num_shared_experts=0, hidden_size=hidden_size,
                        expert_intermediate_size=expert_intermediate_size, dtype=dtype,
                        bytes_per_expert=mean_bytes, dense_bytes=int(sum(head.dense_bytes)), kv_bytes_per_token=0)
    resid_all = np.concatenate([p[5] for p in parts])
    h = hashlib.sha256(path.read_bytes()).hexdigest()
    engine = {
        "policy": "lru",
        "capacity_bytes": engine_cache_bytes,
        "hits": hits, "accesses": accesses,
        # one bit per (row, layer, slot) of the trace, in its order: 1 = resident at that access
        "residency_bits": base64.b64encode(np.packbits(resid_all.reshape(-1))).decode("ascii"),
        "note": "the engine reports every prefill access as not resident",
    }
    if engine_cache_bytes is not None and engine_cache_bytes <= 0:
        raise ConfigError("the engine's cache size must be positive")
    return Trace(
        geometry=geometry,
        requests=tuple(requests),
        request_id=np.concatenate([p[0] for p in parts]),
        iteration=np.concatenate([p[1] for p in parts]),
        position=np.concatenate([p[2] for p in parts]),
        experts=np.concatenate([p[3] for p in parts]),
        weights=np.concatenate([p[4] for p in parts]),
        metadata={
            "source": {"kind": "route_trace-v1", "files": [{"name": path.name, "sha256": h}],
                       "model": head.model, "arch": head.arch, "expert_bytes_per_layer": head.expert_bytes,
                       "dense_bytes_per_layer": head.dense_bytes, "gate": "top-k weights only, no router probabilities"},
            ENGINE_CACHE_KEY: engine,
        },
    )


def engine_residency(trace: Trace) -> np.ndarray | None:
    """bool [n, L, K]: the engine's own cache hit per access, when the trace carries it."""
    engine = trace.metadata.get(ENGINE_CACHE_KEY)
    if not engine or "residency_bits" not in engine:
        return None
    g = trace.geometry
    n = trace.num_tokens * g.num_layers * g.top_k
    bits = np.unpackbits(np.frombuffer(base64.b64decode(engine["residency_bits"]), np.uint8))[:n]
    return bits.astype(bool).reshape(trace.num_tokens, g.num_layers, g.top_k)
