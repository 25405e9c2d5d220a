"""Read and write trace format v1 (Parquet). Every read is validated; every write is atomic."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import fields as dataclass_fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from finemoe.errors import TraceError
from finemoe.files import atomic_path
from finemoe.traces.geometry import Geometry
from finemoe.traces.schema import MISSING_EXPERT, SCHEMA_VERSION, RequestInfo, Trace

METADATA_KEY = b"finemoe"
CHECKSUM_KEY = b"finemoe.sha256"  # sha256 of the METADATA_KEY value: tampered or flipped metadata is caught
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
        # name -> list width of every optional column written: a renamed or lost column is caught
        "optional_columns": {name: columns[name].type.list_size for name in _OPTIONAL_ROUTING if name in columns},
        "metadata": trace.metadata,
    }
    table = pa.table(columns)
    payload = json.dumps(meta).encode()
    return table.replace_schema_metadata({METADATA_KEY: payload, CHECKSUM_KEY: hashlib.sha256(payload).hexdigest().encode()})


def write_trace(trace: Trace, path: str | os.PathLike, *, row_group_size: int = 65536) -> Path:
    """Write a validated trace to one Parquet file, atomically (temporary file, then rename)."""
    path = Path(path)
    validate(trace, where=str(path))
    table = trace_to_table(trace)
    with atomic_path(path) as tmp:
        # page CRCs let the reader tell a flipped bit in the data from a valid value
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size, write_page_checksum=True)
    return path


def trace_files(path: str | os.PathLike) -> list[Path]:
    """The Parquet files a trace path names: the file itself, or a directory's part files."""
    if os.fspath(path) == "":  # Path("") is ".", which would be read as a folder of parts
        raise TraceError("no trace given: the path is empty")
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
    return _metadata_and_schema(Path(path))[0]


def _metadata_and_schema(path: Path) -> tuple[dict, pa.Schema]:
    try:
        return _read_metadata(path)
    except TraceError:
        raise
    except Exception as exc:  # noqa: BLE001 - foreign bytes can break a parser in any way
        raise TraceError(f"{path}: unreadable trace metadata ({type(exc).__name__}: {_first_line(exc)})") from None


def _read_metadata(path: Path) -> tuple[dict, pa.Schema]:
    if path.is_dir():
        raise TraceError(f"{path}: is a directory; read it with read_trace or name one of its part files")
    require_regular_file(path, "trace file")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise TraceError(f"{path}: Parquet file carries no finemoe trace metadata (not a finemoe trace)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise TraceError(f"{path}: finemoe metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise TraceError(f"{path}: finemoe metadata is not a JSON object")
    version = meta.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise TraceError(f"{path}: metadata lacks an integer schema_version")
    if version > SCHEMA_VERSION:
        raise TraceError(
            f"{path}: written with trace schema v{version}, newer than this finemoe reads (v{SCHEMA_VERSION}); "
            "upgrade finemoe"
        )
    if version < 1:
        raise TraceError(f"{path}: invalid trace schema version {version}")
    digest = (schema.metadata or {}).get(CHECKSUM_KEY)
    if digest is not None and hashlib.sha256(raw).hexdigest().encode() != digest:
        raise TraceError(f"{path}: finemoe metadata does not match its checksum (the file was altered or is corrupt)")
    try:
        meta["geometry"] = Geometry.from_dict(_typed(meta["geometry"], Geometry, "geometry"))
        meta["requests"] = [RequestInfo(**_typed(r, RequestInfo, "request")) for r in meta["requests"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"{path}: malformed geometry or requests in metadata ({_first_line(exc)})") from None
    for r in meta["requests"]:
        if r.prompt_tokens < 0 or r.generated_tokens < 0:
            raise TraceError(f"{path}: request {r.request_id} has a negative token count in metadata")
    declared = meta.get("declared_missing_records", 0)
    if not isinstance(declared, int) or isinstance(declared, bool) or declared < 0:
        raise TraceError(f"{path}: declared_missing_records must be a non-negative integer")
    if not isinstance(meta.get("metadata", {}), (dict, type(None))):
        raise TraceError(f"{path}: free-form metadata must be a JSON object")
    meta["columns"] = schema.names
    return meta, schema


def require_regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path`, refused unless it is a regular file, before anything opens it: reading a FIFO blocks
    until someone writes to it (forever, usually) and a device may never end. `what` names it."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise TraceError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise TraceError(f"{path}: cannot access the {what} ({exc.strerror or type(exc).__name__})") from None
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a special file")
        raise TraceError(f"{path}: is {kind}, not a regular file; a {what} must be a regular file")
    return path


_JSON_TYPES = {int: (int,), str: (str,), bool: (bool,), float: (int, float)}


def _typed(data, cls, what: str) -> dict:
    """`data` with each field of dataclass `cls` of its declared JSON type (bools are not ints)."""
    if not isinstance(data, dict):
        raise TypeError(f"{what} is not a JSON object")
    for f in dataclass_fields(cls):
        if f.name not in data:
            continue
        kind = {"int": int, "str": str, "bool": bool, "float": float}.get(str(f.type))
        value = data[f.name]
        if kind is not None and (
            not isinstance(value, _JSON_TYPES[kind]) or (kind is not bool and isinstance(value, bool))
        ):
            raise TypeError(f"{what} field {f.name} is {type(value).__name__}, expected {kind.__name__}")
    return data


def read_trace(path: str | os.PathLike, *, columns: list[str] | None = None) -> Trace:
    """Load and validate a trace (file or directory of parts). `columns` limits optional arrays read."""
    files = trace_files(path)
    pieces = [_read_one_guarded(f, columns) for f in files]
    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0]
    for f, t in zip(files[1:], pieces[1:], strict=True):
        if t.geometry != first.geometry:
            raise TraceError(f"{f}: geometry differs from {files[0]}")
    trace = _concat(pieces)
    validate(trace, where=str(path))
    return trace


def _read_one_guarded(path: Path, columns: list[str] | None) -> Trace:
    try:
        return _read_one(path, columns)
    except TraceError:
        raise
    except MemoryError:
        raise TraceError(f"{path}: too large to load into memory (or its sizes are corrupt)") from None
    except Exception as exc:  # noqa: BLE001 - foreign bytes can break a parser in any way
        raise TraceError(f"{path}: cannot read trace ({type(exc).__name__}: {_first_line(exc)})") from None


_REQUIRED = ["request_id", "iteration", "position", "experts", "weights"]


def _check_columns(path: Path, meta: dict, table_schema: pa.Schema) -> None:
    """The required columns are there, and the optional ones are those the metadata declares, at their widths."""
    missing = [c for c in _REQUIRED if c not in meta["columns"]]
    if missing:
        raise TraceError(f"{path}: required column(s) {', '.join(missing)} missing")
    declared = meta.get("optional_columns")
    if declared is not None:  # absent in files written before it existed
        present = {c for c in meta["columns"] if c not in _REQUIRED}
        if not isinstance(declared, dict) or set(declared) != present:
            lost = sorted(set(declared) - present) if isinstance(declared, dict) else []
            raise TraceError(
                f"{path}: optional columns do not match the metadata "
                f"({'missing ' + ', '.join(lost) if lost else 'unexpected ' + ', '.join(sorted(present - set(declared or {})))})"
            )
        for name, width in declared.items():
            col_type = table_schema.field(name).type
            if not pa.types.is_fixed_size_list(col_type) or col_type.list_size != width:
                raise TraceError(f"{path}: column {name} must be a fixed-size list of {width} values, found {col_type}")


def _read_one(path: Path, columns: list[str] | None) -> Trace:
    meta, table_schema = _read_metadata(path)
    g: Geometry = meta["geometry"]
    required = _REQUIRED
    _check_columns(path, meta, table_schema)
    wanted = [c for c in _OPTIONAL_ROUTING if c in meta["columns"] and (columns is None or c in columns)]
    try:
        table = pq.read_table(path, columns=required + wanted, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as exc:
        raise TraceError(f"{path}: cannot read rows, file is corrupt or truncated ({_first_line(exc)})") from None
    n = table.num_rows
    L, K, J = g.num_layers, g.top_k, g.num_experts

    def ints(name):
        col = table.column(name)
        if col.type != pa.int32():
            raise TraceError(f"{path}: column {name} must be int32, found {col.type}")
        if col.null_count:
            raise TraceError(f"{path}: column {name} has null values")
        return col.to_numpy()

    def fixed(name, width, value_type, shape):
        col = table.column(name)
        if not pa.types.is_fixed_size_list(col.type) or col.type.list_size != width or col.type.value_type != value_type:
            raise TraceError(
                f"{path}: column {name} must be a fixed-size list of {width} {value_type} values, found {col.type}"
            )
        col = col.combine_chunks()
        if col.null_count or col.values.null_count:
            raise TraceError(f"{path}: column {name} has null values")
        values = col.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(shape)

    try:
        semantic = None
        if "semantic_key" in wanted:
            col_type = table.schema.field("semantic_key").type
            dim = col_type.list_size if pa.types.is_fixed_size_list(col_type) else -1
            if dim <= 0:
                raise TraceError(f"{path}: column semantic_key must be a fixed-size list")
            semantic = fixed("semantic_key", dim, pa.float16(), (n, dim))
        i16, f16 = pa.int16(), pa.float16()
        trace = Trace(
            geometry=g,
            requests=tuple(meta["requests"]),
            request_id=ints("request_id"),
            iteration=ints("iteration"),
            position=ints("position"),
            experts=fixed("experts", L * K, i16, (n, L, K)),
            weights=fixed("weights", L * K, f16, (n, L, K)),
            router_probs=fixed("router_probs", L * J, f16, (n, L, J)) if "router_probs" in wanted else None,
            semantic_key=semantic,
            spec_experts=fixed("spec_experts", L * K, i16, (n, L, K)) if "spec_experts" in wanted else None,
            spec_weights=fixed("spec_weights", L * K, f16, (n, L, K)) if "spec_weights" in wanted else None,
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

    request_id = cat("request_id")
    order = None
    if request_id.size and np.any(np.diff(request_id) < 0):
        # parts may hold interleaved request ids: rows go in request order, each request's rows kept as is
        order = np.argsort(request_id, kind="stable")

    def rows(name):
        a = cat(name)
        return a if a is None or order is None else a[order]

    return Trace(
        geometry=pieces[0].geometry,
        requests=tuple(sorted((r for p in pieces for r in p.requests), key=lambda r: r.request_id)),
        request_id=rows("request_id"),
        iteration=rows("iteration"),
        position=rows("position"),
        experts=rows("experts"),
        weights=rows("weights"),
        router_probs=rows("router_probs"),
        semantic_key=rows("semantic_key"),
        spec_experts=rows("spec_experts"),
        spec_weights=rows("spec_weights"),
        metadata=pieces[0].metadata,
    )


def validate(trace: Trace, *, where: str = "trace", declared_missing: int | None = None) -> None:
    """Raise TraceError naming `where` and the first inconsistency found.

    Kept to a few vectorised passes over the routing arrays (it runs on every read): 10^5 tokens x
    64 layers x top-8 validate in well under a second; benchmarks/bench_trace_read.py measures it.
    """
    g = trace.geometry
    n, L, K, J = trace.num_tokens, g.num_layers, g.top_k, g.num_experts
    if trace.request_id.ndim != 1:
        raise TraceError(f"{where}: request_id must be one-dimensional")
    for name in ("iteration", "position"):
        if getattr(trace, name).shape != (n,):
            raise TraceError(f"{where}: {name} has {getattr(trace, name).shape[0]} rows, expected {n}")
    if trace.experts.shape != (n, L, K) or trace.weights.shape != (n, L, K):
        raise TraceError(f"{where}: routing arrays must have shape ({n}, {L}, {K}), top-k width {K}")
    if n == 0:
        raise _empty_trace(where)
    if n and (trace.iteration.min() < 0 or trace.position.min() < 0):
        raise TraceError(f"{where}: negative iteration or position")
    if n:
        slots = np.ascontiguousarray(trace.experts.reshape(n * L, K).T)  # [K, n*L]: one copy, fast compares
        _check_experts(trace.experts, J, K, where, "expert", slots)
        # every top-k slot of a record is missing, or none is; missing records carry zero weight
        missing0 = slots[0] == MISSING_EXPERT
        for k in range(1, K):
            partial = (slots[k] == MISSING_EXPERT) != missing0
            if partial.any():
                row, layer = divmod(int(np.flatnonzero(partial)[0]), L)
                raise TraceError(
                    f"{where}: token row {row} layer {layer} has some but not all of its top-{K} experts missing"
                )
        _check_weights(trace.weights, missing0, n, L, K, where)
    known = {r.request_id for r in trace.requests}
    if len(known) != len(trace.requests):
        raise TraceError(f"{where}: duplicate request ids in the requests table")
    if n:
        present_ids = np.unique(trace.request_id)
        unknown = np.setdiff1d(present_ids, np.fromiter(known, np.int64, len(known)))
        if unknown.size:
            raise TraceError(f"{where}: rows reference request {int(unknown[0])}, absent from the requests table")
        _check_every_request_has_rows(present_ids, trace.requests, where)
        rid = trace.request_id.astype(np.int64)
        d_r, d_i, d_p = np.diff(rid), np.diff(trace.iteration), np.diff(trace.position)
        order_ok = np.all((d_r > 0) | ((d_r == 0) & ((d_i > 0) | ((d_i == 0) & (d_p > 0)))))
        if not order_ok:
            key = np.stack([rid, trace.iteration, trace.position], axis=1)
            if np.unique(key, axis=0).shape[0] != n:
                raise TraceError(f"{where}: duplicate (request, iteration, position) token records")
            raise TraceError(f"{where}: token rows are not sorted by (request, iteration, position)")
        no_prefill = np.fromiter((r.request_id for r in trace.requests if not r.has_prefill), np.int64)
        if no_prefill.size:
            bad = np.isin(rid[trace.iteration == 0], no_prefill)
            if bad.any():
                raise TraceError(
                    f"{where}: request {int(rid[trace.iteration == 0][bad][0])} has prefill (iteration 0) rows "
                    "but the requests table says its prefill was not recorded"
                )
    for name, width in (("router_probs", J), ("spec_experts", K), ("spec_weights", K)):
        arr = getattr(trace, name)
        if arr is not None and arr.shape != (n, L, width):
            raise TraceError(f"{where}: {name} must have shape ({n}, {L}, {width})")
    if trace.semantic_key is not None and (trace.semantic_key.ndim != 2 or trace.semantic_key.shape[0] != n):
        raise TraceError(f"{where}: semantic_key must have one row per token")
    if trace.spec_experts is not None and n:
        _check_experts(trace.spec_experts, J, K, where, "speculative expert")
    _check_optional_values(trace, where)
    if declared_missing is not None and trace.num_missing != declared_missing:
        raise TraceError(
            f"{where}: {trace.num_missing} (token, layer) records are missing but the file declares "
            f"{declared_missing}; the file is inconsistent"
        )


def _empty_trace(where: str) -> TraceError:
    return TraceError(f"{where}: the trace holds no token rows (an empty trace: nothing to inspect, simulate or replay)")


def _check_every_request_has_rows(present_ids: np.ndarray, requests, where: str) -> None:
    """A request listed without rows would be measured as nothing: simulate and replay need its routing."""
    empty = np.setdiff1d(np.fromiter((r.request_id for r in requests), np.int64, len(requests)), present_ids)
    if empty.size:
        r = next(r for r in requests if r.request_id == int(empty[0]))
        raise TraceError(
            f"{where}: request {r.request_id}{f' ({r.label})' if r.label else ''} is listed in the requests "
            f"table but has no token rows ({empty.size} such request(s))"
        )


def _check_experts(experts: np.ndarray, J: int, K: int, where: str, what: str,
                   slots: np.ndarray | None = None) -> None:
    """Ids in range and no expert twice in one (token, layer) record."""
    lo, hi = int(experts.min()), int(experts.max())
    if lo < MISSING_EXPERT or hi >= J:
        bad = hi if hi >= J else lo
        raise TraceError(f"{where}: {what} id {bad} out of range for {J} experts per layer")
    n, L = experts.shape[:2]
    if slots is None:
        slots = np.ascontiguousarray(experts.reshape(n * L, K).T)
    present = slots[0] != MISSING_EXPERT
    if K <= 16:  # pairwise compares on contiguous slot rows beat a sort along a short axis
        dup = np.zeros(n * L, bool)
        for a in range(K):
            for b in range(a + 1, K):
                dup |= slots[a] == slots[b]
    else:
        srt = np.sort(slots, axis=0)
        dup = (np.diff(srt, axis=0) == 0).any(axis=0)
    dup &= present
    if dup.any():
        row, layer = divmod(int(np.flatnonzero(dup)[0]), L)
        raise TraceError(f"{where}: token row {row} layer {layer} routes to the same {what} twice")


def _check_weights(weights: np.ndarray, missing: np.ndarray, n: int, L: int, K: int, where: str) -> None:
    """Gate weights finite and non-negative; zero where the record is missing."""
    w = weights.reshape(n * L, K)
    bad = _bad_values(w, "non-negative").any(axis=1)
    if w.dtype == np.float16:
        nonzero_missing = (w.view(np.uint16)[missing] & 0x7FFF).any()
    else:
        nonzero_missing = (w[missing] != 0).any()
    if bad.any():
        row, layer = divmod(int(np.flatnonzero(bad)[0]), L)
        record = w[row * L + layer]
        value = float(record[_bad_values(record, "non-negative")][0])
        raise TraceError(
            f"{where}: column weights, token row {row} layer {layer} has a negative or non-finite gate weight ({value})"
        )
    if nonzero_missing:
        raise TraceError(f"{where}: a missing (token, layer) record carries non-zero gate weights")


# what each optional float column may hold; a NaN or a negative probability would change every
# policy that reads it without a word
_VALUE_RULES = {
    "router_probs": ("probability", "router probabilities must be finite and within [0, 1]"),
    "spec_weights": ("non-negative", "speculative gate weights must be finite and non-negative"),
    "semantic_key": ("finite", "semantic keys must be finite"),
}


def _bad_values(a: np.ndarray, rule: str) -> np.ndarray:
    """bool mask of the values of `a` that break `rule` ("finite", "non-negative" or "probability").

    float16 columns are tested on their bits (one or two integer compares, no float conversion):
    exponent all ones is inf or NaN, above 0x8000 negative and non-zero, above 0x3C00 more than 1.
    """
    if a.dtype == np.float16:
        bits = a.view(np.uint16)
        if rule == "probability":  # as unsigned: > 1.0, inf, NaN and every negative except -0.0
            return (bits > 0x3C00) & (bits != 0x8000)
        non_finite = (bits & 0x7FFF) >= 0x7C00
        return non_finite if rule == "finite" else non_finite | (bits > 0x8000)
    bad = ~np.isfinite(a)
    if rule != "finite":
        bad |= a < 0
    if rule == "probability":
        bad |= a > 1
    return bad


def _check_optional_values(trace: Trace, where: str) -> None:
    """router_probs, spec_weights and semantic_key hold values their readers can use, else name the first bad one."""
    for name, (rule, why) in _VALUE_RULES.items():
        arr = getattr(trace, name)
        if arr is None or arr.size == 0:
            continue
        bad = _bad_values(arr, rule)
        if bad.any():
            at = np.unravel_index(int(np.argmax(bad)), arr.shape)
            place = f"token row {at[0]} layer {at[1]}" if arr.ndim == 3 else f"token row {at[0]}"
            raise TraceError(f"{where}: column {name}, {place} holds {float(arr[at])}; {why}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
