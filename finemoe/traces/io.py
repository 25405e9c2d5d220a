"""Read and write trace format v1 (Parquet). Every read is validated; every write is atomic."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from finemoe.errors import TraceError
from finemoe.traces.geometry import Geometry
from finemoe.traces.schema import MISSING_EXPERT, SCHEMA_VERSION, RequestInfo, Trace

METADATA_KEY = b"finemoe"
PART_GLOB = "part-*.parquet"
_OPTIONAL_ROUTING = ("router_probs", "semantic_key", "spec_experts", "spec_weights")


def _fixed_list(values: np.ndarray, width: int, value_type: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def trace_to_table(trace: Trace) -> pa.Table:
    """The Arrow table of one trace, with geometry, requests and metadata in the schema metadata."""
    g = trace.geometry
    n, L, K = trace.num_tokens, g.num_layers, g.top_k
    columns = {
        "request_id": pa.array(trace.request_id.astype(np.int32, copy=False)),
        "iteration": pa.array(trace.iteration.astype(np.int32, copy=False)),
        "position": pa.array(trace.position.astype(np.int32, copy=False)),
        "experts": _fixed_list(trace.experts.astype(np.int16, copy=False), L * K, pa.int16()),
        "weights": _fixed_list(trace.weights.astype(np.float16, copy=False), L * K, pa.float16()),
    }
    if trace.router_probs is not None:
        columns["router_probs"] = _fixed_list(
            trace.router_probs.astype(np.float16, copy=False), L * g.num_experts, pa.float16()
        )
    if trace.semantic_key is not None:
        dim = trace.semantic_key.shape[1]
        columns["semantic_key"] = _fixed_list(trace.semantic_key.astype(np.float16, copy=False), dim, pa.float16())
    if trace.spec_experts is not None:
        columns["spec_experts"] = _fixed_list(trace.spec_experts.astype(np.int16, copy=False), L * K, pa.int16())
        spec_w = trace.spec_weights if trace.spec_weights is not None else np.zeros((n, L, K), np.float16)
        columns["spec_weights"] = _fixed_list(spec_w.astype(np.float16, copy=False), L * K, pa.float16())
    meta = {
        "schema_version": SCHEMA_VERSION,
        "geometry": g.to_dict(),
        "requests": [r.to_dict() for r in trace.requests],
        "declared_missing_records": trace.num_missing,
        "metadata": trace.metadata,
    }
    table = pa.table(columns)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})


def write_trace(trace: Trace, path: str | os.PathLike, *, row_group_size: int = 65536) -> Path:
    """Write a validated trace to one Parquet file, atomically (temporary file, then rename)."""
    path = Path(path)
    validate(trace, where=str(path))
    table = trace_to_table(trace)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def trace_files(path: str | os.PathLike) -> list[Path]:
    """The Parquet files a trace path names: the file itself, or a directory's part files."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no such trace file or directory")
    if path.is_dir():
        parts = sorted(path.glob(PART_GLOB))
        if not parts:
            raise TraceError(f"{path}: directory holds no trace part files ({PART_GLOB})")
        return parts
    return [path]


def read_metadata(path: str | os.PathLike) -> dict:
    """The finemoe metadata of one file, checked for version and geometry, without reading rows."""
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TraceError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise TraceError(f"{path}: Parquet file carries no finemoe trace metadata (not a finemoe trace)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise TraceError(f"{path}: finemoe metadata is not valid JSON") from None
    version = meta.get("schema_version")
    if not isinstance(version, int):
        raise TraceError(f"{path}: metadata lacks an integer schema_version")
    if version > SCHEMA_VERSION:
        raise TraceError(
            f"{path}: written with trace schema v{version}, newer than this finemoe reads (v{SCHEMA_VERSION}); "
            "upgrade finemoe"
        )
    if version < 1:
        raise TraceError(f"{path}: invalid trace schema version {version}")
    try:
        meta["geometry"] = Geometry.from_dict(meta["geometry"])
        meta["requests"] = [RequestInfo(**r) for r in meta["requests"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"{path}: malformed geometry or requests in metadata ({_first_line(exc)})") from None
    meta["columns"] = schema.names
    return meta


def read_trace(path: str | os.PathLike, *, columns: list[str] | None = None) -> Trace:
    """Load and validate a trace (file or directory of parts). `columns` limits optional arrays read."""
    files = trace_files(path)
    pieces = [_read_one(f, columns) for f in files]
    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0]
    for f, t in zip(files[1:], pieces[1:], strict=True):
        if t.geometry != first.geometry:
            raise TraceError(f"{f}: geometry differs from {files[0]}")
    trace = _concat(pieces)
    validate(trace, where=str(path))
    return trace


def _read_one(path: Path, columns: list[str] | None) -> Trace:
    meta = read_metadata(path)
    g: Geometry = meta["geometry"]
    required = ["request_id", "iteration", "position", "experts", "weights"]
    missing = [c for c in required if c not in meta["columns"]]
    if missing:
        raise TraceError(f"{path}: required column(s) {', '.join(missing)} missing")
    wanted = [c for c in _OPTIONAL_ROUTING if c in meta["columns"] and (columns is None or c in columns)]
    try:
        table = pq.read_table(path, columns=required + wanted)
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"{path}: cannot read rows, file is corrupt or truncated ({_first_line(exc)})") from None
    n = table.num_rows
    L, K, J = g.num_layers, g.top_k, g.num_experts

    def ints(name):
        col = table.column(name)
        if col.null_count:
            raise TraceError(f"{path}: column {name} has null values")
        try:
            return col.to_numpy().astype(np.int32, copy=False)
        except (pa.ArrowException, TypeError):
            raise TraceError(f"{path}: column {name} is not an integer column") from None

    def fixed(name, width, dtype, shape):
        col = table.column(name).combine_chunks()
        if not pa.types.is_fixed_size_list(col.type) or col.type.list_size != width:
            raise TraceError(
                f"{path}: column {name} must be a fixed-size list of {width} values, found {col.type}"
            )
        if col.null_count:
            raise TraceError(f"{path}: column {name} has null rows")
        values = col.flatten().to_numpy(zero_copy_only=False)
        return values.astype(dtype, copy=False).reshape(shape)

    try:
        semantic = None
        if "semantic_key" in wanted:
            col_type = table.schema.field("semantic_key").type
            dim = col_type.list_size if pa.types.is_fixed_size_list(col_type) else -1
            if dim <= 0:
                raise TraceError(f"{path}: column semantic_key must be a fixed-size list")
            semantic = fixed("semantic_key", dim, np.float16, (n, dim))
        trace = Trace(
            geometry=g,
            requests=tuple(meta["requests"]),
            request_id=ints("request_id"),
            iteration=ints("iteration"),
            position=ints("position"),
            experts=fixed("experts", L * K, np.int16, (n, L, K)),
            weights=fixed("weights", L * K, np.float16, (n, L, K)),
            router_probs=fixed("router_probs", L * J, np.float16, (n, L, J)) if "router_probs" in wanted else None,
            semantic_key=semantic,
            spec_experts=fixed("spec_experts", L * K, np.int16, (n, L, K)) if "spec_experts" in wanted else None,
            spec_weights=fixed("spec_weights", L * K, np.float16, (n, L, K)) if "spec_weights" in wanted else None,
            metadata=meta.get("metadata") or {},
        )
    except (pa.ArrowException, ValueError) as exc:
        raise TraceError(f"{path}: malformed routing columns ({_first_line(exc)})") from None
    validate(trace, where=str(path), declared_missing=meta.get("declared_missing_records", 0))
    return trace


def _concat(pieces: list[Trace]) -> Trace:
    def cat(name):
        arrays = [getattr(p, name) for p in pieces]
        if any(a is None for a in arrays):
            return None
        return np.concatenate(arrays)

    return Trace(
        geometry=pieces[0].geometry,
        requests=tuple(r for p in pieces for r in p.requests),
        request_id=cat("request_id"),
        iteration=cat("iteration"),
        position=cat("position"),
        experts=cat("experts"),
        weights=cat("weights"),
        router_probs=cat("router_probs"),
        semantic_key=cat("semantic_key"),
        spec_experts=cat("spec_experts"),
        spec_weights=cat("spec_weights"),
        metadata=pieces[0].metadata,
    )


def validate(trace: Trace, *, where: str = "trace", declared_missing: int | None = None) -> None:
    """Raise TraceError naming `where` and the first inconsistency found."""
    g = trace.geometry
    n, L, K, J = trace.num_tokens, g.num_layers, g.top_k, g.num_experts
    for name in ("iteration", "position"):
        if getattr(trace, name).shape != (n,):
            raise TraceError(f"{where}: {name} has {getattr(trace, name).shape[0]} rows, expected {n}")
    if trace.experts.shape != (n, L, K) or trace.weights.shape != (n, L, K):
        raise TraceError(f"{where}: routing arrays must have shape ({n}, {L}, {K}), top-k width {K}")
    if n and (trace.iteration.min() < 0 or trace.position.min() < 0):
        raise TraceError(f"{where}: negative iteration or position")
    if n:
        lo, hi = int(trace.experts.min()), int(trace.experts.max())
        if lo < MISSING_EXPERT or hi >= J:
            bad = hi if hi >= J else lo
            raise TraceError(f"{where}: expert id {bad} out of range for {J} experts per layer")
        missing = trace.experts == MISSING_EXPERT
        partial = missing.any(axis=2) & ~missing.all(axis=2)
        if partial.any():
            row, layer = np.argwhere(partial)[0]
            raise TraceError(
                f"{where}: token row {row} layer {layer} has some but not all of its top-{K} experts missing"
            )
        present = ~missing[:, :, 0]
        sorted_e = np.sort(trace.experts, axis=2)
        dup = (np.diff(sorted_e, axis=2) == 0).any(axis=2) & present
        if dup.any():
            row, layer = np.argwhere(dup)[0]
            raise TraceError(f"{where}: token row {row} layer {layer} routes to the same expert twice")
    known = {r.request_id for r in trace.requests}
    if len(known) != len(trace.requests):
        raise TraceError(f"{where}: duplicate request ids in the requests table")
    if n:
        unknown = np.setdiff1d(np.unique(trace.request_id), np.fromiter(known, np.int64, len(known)))
        if unknown.size:
            raise TraceError(f"{where}: rows reference request {int(unknown[0])}, absent from the requests table")
        key = np.stack([trace.request_id.astype(np.int64), trace.iteration, trace.position], axis=1)
        order_ok = np.all(
            (np.diff(key[:, 0]) > 0)
            | ((np.diff(key[:, 0]) == 0) & (np.diff(key[:, 1]) > 0))
            | ((np.diff(key[:, 0]) == 0) & (np.diff(key[:, 1]) == 0) & (np.diff(key[:, 2]) > 0))
        )
        if not order_ok:
            uniq = np.unique(key, axis=0)
            if uniq.shape[0] != n:
                raise TraceError(f"{where}: duplicate (request, iteration, position) token records")
            raise TraceError(f"{where}: token rows are not sorted by (request, iteration, position)")
    for name, width in (("router_probs", J), ("spec_experts", K), ("spec_weights", K)):
        arr = getattr(trace, name)
        if arr is not None and arr.shape != (n, L, width):
            raise TraceError(f"{where}: {name} must have shape ({n}, {L}, {width})")
    if trace.semantic_key is not None and (trace.semantic_key.ndim != 2 or trace.semantic_key.shape[0] != n):
        raise TraceError(f"{where}: semantic_key must have one row per token")
    if trace.spec_experts is not None and n:
        if int(trace.spec_experts.max()) >= J or int(trace.spec_experts.min()) < MISSING_EXPERT:
            raise TraceError(f"{where}: speculative expert id out of range for {J} experts")
    if declared_missing is not None and trace.num_missing != declared_missing:
        raise TraceError(
            f"{where}: {trace.num_missing} (token, layer) records are missing but the file declares "
            f"{declared_missing}; the file is inconsistent"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
