"""Import routing logs in JSON Lines (one record per token and layer, vLLM-hook style) into a trace.

A record names its request (one or more key fields), its layer, its token and the top-k experts with
their gate weights, e.g. the Mixtral logs in ../shared/traces:
`{"dataset": "gsm8k", "problem_id": 0, "layer": 3, "token_idx": 7, "experts": [5, 1], "gating_probs": [0.8, 0.2]}`.

Three layouts of the token field are understood (`layout`):
- `decode`: the field counts decode tokens only (0, 1, ...); decode token t is iteration t + 1 and
  the prefill is absent (`has_prefill=False`).
- `positions`: the field is the absolute position, prompt tokens first; the prompt length cannot be
  read off such a log, so it must be given (`prompt_tokens` or `decode_tokens_from`).
- `steps`: the field is the token's index inside one engine step, so every decode token logs 0; steps
  are told apart only by the order the logger wrote them in: a new step starts wherever
  (layer, field) does not increase. The first step of a request is its prefill (its positions give
  the prompt length), each later step must hold exactly one decode token.
`auto` picks `decode` when records carry the token key, else `steps` when some (layer, position)
pair repeats within a request, else `positions`.

Records may come in any order (except that `steps` relies on the write order). Files are read in
Arrow record batches, so memory holds compact arrays, never one Python object per record. A
(token, layer) record absent from the log is stored as MISSING_EXPERT with zero weights and counted
in the report; nothing is invented.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from finemoe.errors import ConfigError, TraceError
from finemoe.traces.geometry import DTYPE_BYTES, Geometry
from finemoe.traces.importers.batched import map_batched, step_index
from finemoe.traces.importers.bounds import check_token_span
from finemoe.traces.io import require_regular_file
from finemoe.traces.schema import LAYERS_LOGGED_KEY, MISSING_EXPERT, RequestInfo, Trace

FILE_KEY = "@file"  # pseudo request-key field: the input file's name without extension
LAYOUTS = ("auto", "decode", "positions", "steps", "batched")
META_TYPE = "meta"  # leading records {"type": "meta", ...} are the log's header, not routing


@dataclass(frozen=True)
class FieldMap:
    """Names of the fields of one routing record; change them to import other loggers' layouts."""

    request_key: tuple[str, ...] = ("dataset", "problem_id")
    token_key: str = "token_idx"  # decode-token index (layout "decode")
    position_key: str = "token_pos"  # position field (layouts "positions" and "steps")
    layer_key: str = "layer"
    experts_key: str = "experts"
    weights_key: str = "gating_probs"


@dataclass
class RequestReport:
    label: str
    file: str
    layout: str
    prompt_tokens: int | None  # None: the log does not say and nobody told us
    generated_tokens: int
    has_prefill: bool
    tokens_with_gaps: int  # rows that lack some but not all layers
    tokens_absent: int  # rows with no record at all (an index skipped by the log)
    missing_records: int


@dataclass
class ImportReport:
    files: list[dict] = field(default_factory=list)
    requests: list[RequestReport] = field(default_factory=list)
    records_read: int = 0
    duplicate_records_dropped: int = 0
    layers_logged: list[int] | None = None  # None: every layer

    @property
    def missing_records(self) -> int:
        return sum(r.missing_records for r in self.requests)

    @property
    def tokens_with_gaps(self) -> int:
        return sum(r.tokens_with_gaps for r in self.requests)

    @property
    def tokens_absent(self) -> int:
        return sum(r.tokens_absent for r in self.requests)

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "records_read": self.records_read,
            "duplicate_records_dropped": self.duplicate_records_dropped,
            "missing_records": self.missing_records,
            "tokens_with_gaps": self.tokens_with_gaps,
            "tokens_absent": self.tokens_absent,
            "layers_logged": self.layers_logged,
            "requests": [asdict(r) for r in self.requests],
        }

    def lines(self) -> list[str]:
        """A human summary, one line per request plus totals."""
        out = []
        for f in self.files:
            extra = ""
            if f.get("filtered_out"):
                extra += f", {f['filtered_out']:,} other records left out (--where, meta)"
            if f.get("warmup_steps_dropped"):
                extra += (f", {f['warmup_steps_dropped']} warm-up step(s) dropped "
                          f"({f['warmup_records_dropped']:,} records)")
            out.append(f"{f['name']}: {f['records']:,} records, layout {f['layout']}{extra}")
        for r in self.requests:
            prompt = "unknown" if r.prompt_tokens is None else str(r.prompt_tokens)
            gaps = ""
            if r.missing_records:
                gaps = f"; {r.tokens_with_gaps + r.tokens_absent} token(s) with missing layers ({r.missing_records} records)"
            out.append(
                f"  {r.label}: prompt {prompt}, {r.generated_tokens} decode tokens, "
                f"prefill {'recorded' if r.has_prefill else 'absent'}{gaps}"
            )
        out.append(
            f"{self.records_read:,} records -> {len(self.requests)} requests; "
            f"{self.tokens_with_gaps + self.tokens_absent} token(s) lack some layer "
            f"({self.missing_records} missing (token, layer) records, stored as missing, not invented); "
            f"{self.duplicate_records_dropped} identical duplicate record(s) dropped"
        )
        if self.layers_logged:
            shown = ", ".join(map(str, self.layers_logged[:12])) + (", ..." if len(self.layers_logged) > 12 else "")
            out.append(f"layers logged: {len(self.layers_logged)} ({shown}); the trace records which, "
                       "the others are not in the log")
        return out


# ---------------------------------------------------------------------------------------------
# geometry


def explicit_geometry(
    *,
    num_layers: int,
    num_experts: int,
    top_k: int,
    hidden_size: int,
    expert_intermediate_size: int,
    dtype: str = "bfloat16",
    num_shared_experts: int = 0,
    dense_bytes: int = 0,
    kv_bytes_per_token: int = 0,
    model_name: str = "custom",
) -> Geometry:
    """A geometry from sizes a user gives; expert bytes follow the gated-FFN rule (3 matrices)."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    try:
        return Geometry(
            model_name=model_name,
            num_layers=num_layers,
            num_experts=num_experts,
            top_k=top_k,
            num_shared_experts=num_shared_experts,
            hidden_size=hidden_size,
            expert_intermediate_size=expert_intermediate_size,
            dtype=dtype,
            bytes_per_expert=int(round(3 * hidden_size * expert_intermediate_size * DTYPE_BYTES[dtype])),
            dense_bytes=dense_bytes,
            kv_bytes_per_token=kv_bytes_per_token,
        )
    except ValueError as exc:
        raise ConfigError(f"invalid model geometry: {exc}") from None


# ---------------------------------------------------------------------------------------------
# reading one log


@dataclass
class _RawLog:
    """All records of one file as arrays, in file order."""

    path: Path
    labels: list[str]  # local request code -> label, in natural order of the key values
    req: np.ndarray  # int32 [n] local request code
    layer: np.ndarray  # int64 [n]
    tok: np.ndarray  # int64 [n] value of the token or position field
    experts: np.ndarray  # int64 [n, K]
    weights: np.ndarray  # float64 [n, K]
    tok_field: str
    sha256: str
    record_no: np.ndarray  # int64 [n]: each record's number in the file (1-based, header included)
    meta: dict = field(default_factory=dict)  # the header record(s), merged
    filtered_out: int = 0  # records --where left out


@dataclass
class _Head:
    """The start of a log: header records, the byte offset where routing records begin, the first one."""

    meta: dict
    header_records: int
    body_offset: int
    first: dict


def _is_meta(rec: dict) -> bool:
    return rec.get("type") == META_TYPE


def _matches(rec: dict, where: Mapping[str, str]) -> bool:
    return all(str(rec.get(k)) == v for k, v in where.items())


def read_head(path: str | os.PathLike, where: Mapping[str, str] | None = None) -> _Head:
    """Leading meta records (merged), and the first record that is routing and passes `where`."""
    path = Path(path)
    where = where or {}
    meta: dict = {}
    header = 0
    body = 0
    in_header = True
    with open(path, "rb") as fh:
        for lineno, line in enumerate(iter(fh.readline, b""), 1):
            if not line.strip():
                if in_header:
                    body = fh.tell()
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise TraceError(f"{path}: line {lineno} is not valid JSON (expected JSON Lines)") from None
            if not isinstance(rec, dict):
                raise TraceError(f"{path}: line {lineno} is not a JSON object")
            if _is_meta(rec) and in_header:
                meta.update({k: v for k, v in rec.items() if k != "type"})
                header += 1
                body = fh.tell()
                continue
            in_header = False
            if _matches(rec, where) and not _is_meta(rec):
                return _Head(meta, header, body, rec)
    what = f"no record matches --where {','.join(f'{k}={v}' for k, v in where.items())}" if where else "file holds no records"
    raise TraceError(f"{path}: {what}")


def _locate_bad_line(path: Path) -> str:
    """Only on the error path: the first line Python's json cannot parse, for a precise message."""
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return f"line {lineno} is not valid JSON"
    return ""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_log(path: str | os.PathLike, fields: FieldMap, layout: str = "auto",
             block_size: int = 16 << 20, where: Mapping[str, str] | None = None) -> _RawLog:
    """Stream one JSONL routing log into arrays; every malformed record is a TraceError.

    Leading `{"type": "meta"}` records are the header (kept as `meta`); meta records later on and
    records failing `where` (field -> value, compared as text) are left out."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    path = Path(path)
    require_regular_file(path, "routing log")
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    where = dict(where or {})
    head = read_head(path, where)
    first = head.first
    if layout in ("decode", "batched"):
        tok_field = fields.token_key
    elif layout in ("positions", "steps"):
        tok_field = fields.position_key
    elif fields.token_key in first:
        tok_field = fields.token_key
    elif fields.position_key in first:
        tok_field = fields.position_key
    else:
        raise TraceError(
            f"{path}: records have neither a {fields.token_key!r} nor a {fields.position_key!r} field "
            f"(fields: {', '.join(first)}); name the token field with --token-key or --position-key"
        )
    keys = [k for k in fields.request_key if k != FILE_KEY]
    needed = [*keys, fields.layer_key, tok_field, fields.experts_key, fields.weights_key]
    absent = [k for k in needed if k not in first]
    if absent:
        raise TraceError(
            f"{path}: first record lacks field(s) {', '.join(absent)} (it has {', '.join(first)}); "
            "name the right fields with --request-key/--token-key/--layer-key/--experts-key/--weights-key"
        )
    schema = pa.schema([
        (fields.layer_key, pa.int64()),
        (tok_field, pa.int64()),
        (fields.experts_key, pa.list_(pa.int64())),
        (fields.weights_key, pa.list_(pa.float64())),
    ])
    label_code: dict[str, int] = {}
    parts: dict[str, list[np.ndarray]] = {"req": [], "layer": [], "tok": [], "experts": [], "weights": []}
    top_k = len(first[fields.experts_key]) if isinstance(first[fields.experts_key], list) else -1
    offset = 0
    seen_records = head.header_records
    filtered = 0
    record_nos: list[np.ndarray] = []
    fh = open(path, "rb")  # noqa: SIM115 - closed in the finally below; pyarrow reads from the header's end
    try:
        fh.seek(head.body_offset)
        reader = pj.open_json(
            fh,
            read_options=pj.ReadOptions(block_size=block_size),
            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer"),
        )
        for batch in reader:
            numbers = seen_records + 1 + np.arange(batch.num_rows, dtype=np.int64)
            seen_records += batch.num_rows
            batch, keep = _filter_batch(batch, where)
            if keep is not None:
                filtered += int((~keep).sum())
                numbers = numbers[keep]
            n = batch.num_rows
            if n == 0:
                continue
            record_nos.append(numbers)
            for name in needed:
                idx = batch.schema.get_field_index(name)
                col = batch.column(idx) if idx >= 0 else None
                if col is None or col.null_count:
                    row = 0 if col is None else int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                    raise TraceError(f"{path}: record {int(numbers[row])} lacks field {name!r}")
            ex = batch.column(batch.schema.get_field_index(fields.experts_key))
            wt = batch.column(batch.schema.get_field_index(fields.weights_key))
            for name, col in ((fields.experts_key, ex), (fields.weights_key, wt)):
                values = col.flatten()
                if values.null_count:
                    parent = np.asarray(pc.list_parent_indices(col))
                    first_bad = int(parent[np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]])
                    raise TraceError(f"{path}: record {int(numbers[first_bad])} has a null value in {name!r}")
                lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
                bad = np.flatnonzero(lengths != top_k)
                if bad.size:
                    raise TraceError(
                        f"{path}: record {int(numbers[bad[0]])} has {int(lengths[bad[0]])} values in "
                        f"{name!r}, the first record has {top_k}; every record must list the same top-k"
                    )
            if keys:
                cols = [pc.cast(batch.column(batch.schema.get_field_index(k)), pa.string()) for k in keys]
                label = cols[0] if len(cols) == 1 else pc.binary_join_element_wise(*cols, "/")
                enc = pc.dictionary_encode(label).combine_chunks() if hasattr(label, "chunks") else pc.dictionary_encode(label)
                local = [label_code.setdefault(s, len(label_code)) for s in enc.dictionary.to_pylist()]
                codes = np.asarray(local, dtype=np.int32)[enc.indices.to_numpy(zero_copy_only=False)]
            else:
                label_code.setdefault("", 0)
                codes = np.zeros(n, np.int32)
            parts["req"].append(codes)
            parts["layer"].append(batch.column(batch.schema.get_field_index(fields.layer_key)).to_numpy())
            parts["tok"].append(batch.column(batch.schema.get_field_index(tok_field)).to_numpy())
            parts["experts"].append(ex.flatten().to_numpy().reshape(n, top_k))
            parts["weights"].append(wt.flatten().to_numpy().reshape(n, top_k))
            offset += n
    except TraceError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        bad_line = _locate_bad_line(path)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(f"{path}: {bad_line or 'cannot parse the log'} ({msg})") from None
    finally:
        fh.close()
    if offset == 0:
        raise TraceError(f"{path}: file holds no records")
    stem = path.name.split(".")[0]
    labels = list(label_code)
    if FILE_KEY in fields.request_key:
        # put the file stem where @file stands in the key
        pos = fields.request_key.index(FILE_KEY)
        def with_file(lbl: str) -> str:
            parts_ = lbl.split("/") if keys else []
            parts_.insert(pos, stem)
            return "/".join(parts_)
        labels = [with_file(lbl) for lbl in labels]
    # requests in natural key order (numbers compared as numbers), whatever order records came in
    order = sorted(range(len(labels)), key=lambda i: _natural(labels[i]))
    remap = np.empty(len(labels), np.int32)
    remap[order] = np.arange(len(labels), dtype=np.int32)
    raw = _RawLog(
        path=path,
        labels=[labels[i] for i in order],
        req=remap[np.concatenate(parts["req"])],
        layer=np.concatenate(parts["layer"]).astype(np.int64, copy=False),
        tok=np.concatenate(parts["tok"]).astype(np.int64, copy=False),
        experts=np.concatenate(parts["experts"]).astype(np.int64, copy=False),
        weights=np.concatenate(parts["weights"]).astype(np.float64, copy=False),
        tok_field=tok_field,
        sha256=_sha256(path),
        record_no=np.concatenate(record_nos),
        meta=head.meta,
        filtered_out=filtered,
    )
    _check_values(raw, fields)
    return raw


def _filter_batch(batch, where: Mapping[str, str]):
    """The batch without meta records and records failing `where`; keep mask (None: all kept)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    conds = {**where}
    names = batch.schema.names
    mask = None
    if "type" in names and "type" not in conds:
        col = pc.cast(batch.column(names.index("type")), pa.string())
        mask = pc.fill_null(pc.not_equal(col, META_TYPE), True)
    for key, value in conds.items():
        if key in names:
            col = pc.cast(batch.column(names.index(key)), pa.string())
            cond = pc.fill_null(pc.equal(col, value), False)
        else:
            cond = pa.array(np.zeros(batch.num_rows, bool))
        mask = cond if mask is None else pc.and_(mask, cond)
    if mask is None:
        return batch, None
    keep = mask.to_numpy(zero_copy_only=False).astype(bool)
    return (batch, None) if keep.all() else (batch.filter(mask), keep)


def _natural(label: str) -> tuple:
    return tuple((0, int(p), "") if p.lstrip("-").isdigit() else (1, 0, p) for p in label.split("/"))


def _check_values(raw: _RawLog, fields: FieldMap) -> None:
    def fail(mask: np.ndarray, what: str) -> None:
        bad = np.flatnonzero(mask)
        if bad.size:
            raise TraceError(f"{raw.path}: record {int(raw.record_no[bad[0]])} {what} ({bad.size} such records)")

    fail(raw.layer < 0, f"has a negative {fields.layer_key!r}")
    fail(raw.tok < 0, f"has a negative {raw.tok_field!r}")
    check_token_span(raw.path, raw.tok, raw.req, raw.labels, raw.record_no, raw.tok_field)
    fail((raw.experts < 0).any(axis=1), f"has a negative expert id in {fields.experts_key!r}")
    fail(~np.isfinite(raw.weights).all(axis=1) | (raw.weights < 0).any(axis=1),
         f"has a negative or non-finite gate weight in {fields.weights_key!r}")
    srt = np.sort(raw.experts, axis=1)
    fail((np.diff(srt, axis=1) == 0).any(axis=1), f"lists the same expert twice in {fields.experts_key!r}")


# ---------------------------------------------------------------------------------------------
# from records to token rows


@dataclass
class _Rows:
    """Where each record of one file goes: request code -> token rows, record -> row in request."""

    row_in_request: np.ndarray  # int64 [n]
    iteration: list[np.ndarray]  # per local request: int32 [rows]
    position: list[np.ndarray]
    prompt_tokens: list[int | None]
    generated: list[int]
    has_prefill: list[bool]
    layout: str


def _resolve_layout(raw: _RawLog, fields: FieldMap, layout: str) -> str:
    if layout != "auto":
        return layout
    if raw.tok_field == fields.token_key:
        return "decode"
    # a (request, layer, position) that repeats means positions restart every engine step
    span = int(raw.tok.max()) + 1
    key = (raw.req.astype(np.int64) * (int(raw.layer.max()) + 1) + raw.layer) * span + raw.tok
    return "steps" if np.unique(key).size < key.size else "positions"


def _rows_for(raw: _RawLog, layout: str, prompt_of: Mapping[str, int], decode_of: Mapping[str, int]) -> _Rows:
    n_req = len(raw.labels)
    row = np.empty(raw.req.shape[0], np.int64)
    its, poss, prompts, gens, prefills = [], [], [], [], []
    for r, label in enumerate(raw.labels):
        idx = np.flatnonzero(raw.req == r)  # file order
        tok = raw.tok[idx]
        if layout == "decode":
            t_len = int(tok.max()) + 1
            p = prompt_of.get(label)
            row[idx] = tok
            its.append(np.arange(1, t_len + 1, dtype=np.int32))
            poss.append((p or 0) + np.arange(t_len, dtype=np.int32))
            prompts.append(p)
            gens.append(t_len)
            prefills.append(False)
        elif layout == "positions":
            t_len = int(tok.max()) + 1
            if label in prompt_of:
                p = prompt_of[label]
            elif label in decode_of:
                p = t_len - decode_of[label]
            else:
                raise ConfigError(
                    f"{raw.path}: request {label} logs {t_len} positions (prompt and decode together) "
                    "and the log does not say where the prompt ends; give --prompt-tokens N "
                    "or --decode-tokens-from a decode-only log of the same request"
                )
            if not 0 <= p <= t_len:
                raise ConfigError(f"{raw.path}: request {label}: prompt of {p} tokens does not fit its {t_len} positions")
            row[idx] = tok
            pos = np.arange(t_len, dtype=np.int32)
            its.append(np.where(pos < p, 0, pos - p + 1).astype(np.int32))
            poss.append(pos)
            prompts.append(p)
            gens.append(t_len - p)
            prefills.append(p > 0)
        else:  # steps
            step = step_index(raw.layer[idx], tok)
            new_step = np.ones(idx.size, bool)
            new_step[1:] = step[1:] != step[:-1]
            n_steps = int(step[-1]) + 1
            in_prefill = step == 0
            p = int(tok[in_prefill].max()) + 1
            if label in prompt_of and prompt_of[label] != p:
                raise ConfigError(
                    f"{raw.path}: request {label}: its first engine step (the prefill) holds {p} "
                    f"positions, but the prompt was given as {prompt_of[label]} tokens"
                )
            dec = ~in_prefill
            if dec.any():
                first_tok = tok[np.flatnonzero(new_step)]  # each step's first record
                multi = dec & (tok != first_tok[step])
                if multi.any():
                    s = int(step[np.flatnonzero(multi)[0]])
                    raise TraceError(
                        f"{raw.path}: request {label}: engine step {s} holds more than one token; only one "
                        "prefill step followed by one-token decode steps is understood (chunked prefill "
                        "or a batched log? try --layout batched --prompt-tokens N1,N2,..., or "
                        "--layout positions)"
                    )
            row[idx] = np.where(in_prefill, tok, p + step - 1)
            t_len = p + n_steps - 1
            its.append(np.concatenate([np.zeros(p, np.int32), np.arange(1, n_steps, dtype=np.int32)]))
            poss.append(np.arange(t_len, dtype=np.int32))
            prompts.append(p)
            gens.append(n_steps - 1)
            prefills.append(True)
    assert len(its) == n_req
    return _Rows(row, its, poss, prompts, gens, prefills, layout)


def log_lengths(paths: Iterable[str | os.PathLike], fields: FieldMap, layout: str = "auto") -> dict[str, tuple[int | None, int]]:
    """(prompt tokens or None, decode tokens) per request label, as the logs show them."""
    out: dict[str, tuple[int | None, int]] = {}
    for path in paths:
        raw = read_log(path, fields, layout)
        lay = _resolve_layout(raw, fields, layout)
        if lay == "positions":
            raise ConfigError(
                f"{path}: a log of absolute positions does not show where its prompt ends, so it "
                "cannot tell other logs their lengths"
            )
        rows = _rows_for(raw, lay, {}, {})
        for label, p, g in zip(raw.labels, rows.prompt_tokens, rows.generated, strict=True):
            out[label] = (p, g)
    return out


# ---------------------------------------------------------------------------------------------
# the importer


def import_jsonl(
    paths: Iterable[str | os.PathLike],
    geometry: Geometry,
    *,
    fields: FieldMap | None = None,
    layout: str = "auto",
    prompt_tokens: int | Mapping[str, int] | Sequence[int] | None = None,
    prompt_tokens_from: Iterable[str | os.PathLike] = (),
    decode_tokens_from: Iterable[str | os.PathLike] = (),
    progress: bool = False,
    where: Mapping[str, str] | None = None,
    generated_tokens: Sequence[int] | None = None,
    skip_steps: int = 0,
    detect_warmup: bool = True,
) -> tuple[Trace, ImportReport]:
    """Read routing logs into one trace; gaps are stored as missing and reported, never filled in.

    `where` keeps only records whose fields have these values. Layout `batched` (one engine's
    steps, rows mapped to sequences, see finemoe.traces.importers.batched) takes the prompts'
    lengths as a sequence in `prompt_tokens`, optionally each sequence's decode steps in
    `generated_tokens`, and drops `skip_steps` leading steps, then detected warm-up steps."""
    fields = fields or FieldMap()
    batched_prompts: list[int] | None = None
    if isinstance(prompt_tokens, Sequence) and not isinstance(prompt_tokens, str):
        batched_prompts = [int(v) for v in prompt_tokens]
        prompt_tokens = None
    if layout == "batched" and batched_prompts is None:
        if not isinstance(prompt_tokens, int):
            raise ConfigError("layout batched needs the prompts' lengths in admission order: --prompt-tokens N1,N2,...")
        batched_prompts, prompt_tokens = [prompt_tokens], None
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConfigError("no routing log given")
    L, J, K = geometry.num_layers, geometry.num_experts, geometry.top_k
    prompt_of: dict[str, int] = {}
    for source in prompt_tokens_from:
        known = {label: p for label, (p, _) in log_lengths([source], fields).items() if p is not None}
        if not known:
            raise ConfigError(f"{source}: records no prefill, so it cannot tell prompt lengths (--prompt-tokens-from)")
        prompt_of.update(known)
    decode_of = {label: g for label, (_, g) in log_lengths(decode_tokens_from, fields).items()} if decode_tokens_from else {}
    explicit_all: int | None = None
    if isinstance(prompt_tokens, int):
        if prompt_tokens < 0:
            raise ConfigError(f"prompt tokens must not be negative, got {prompt_tokens}")
        explicit_all = prompt_tokens
    elif prompt_tokens:
        prompt_of.update({str(k): int(v) for k, v in prompt_tokens.items()})

    report = ImportReport()
    requests: list[RequestInfo] = []
    chunks: list[tuple[np.ndarray, ...]] = []  # per request: iteration, position, experts, weights
    seen: dict[str, Path] = {}
    unknown_prompt: list[str] = []
    logged: set[int] = set()
    declared_layers: set[int] | None = None
    missing_masks: list[np.ndarray] = []
    iterator = paths
    if progress:
        from tqdm import tqdm

        iterator = tqdm(paths, desc="import", unit="file")
    for path in iterator:
        raw = read_log(path, fields, layout, where=where)
        lay = _resolve_layout(raw, fields, layout)
        declared = check_meta(raw.meta, geometry, path)
        if declared is not None:
            declared_layers = (declared_layers or set()) | declared
            stray = np.flatnonzero(~np.isin(raw.layer, sorted(declared)))
            if stray.size:
                raise TraceError(f"{path}: record {int(raw.record_no[stray[0]])} names layer "
                                 f"{int(raw.layer[stray[0]])}, which the header's layers_logged does not list")
        if int(raw.layer.max()) >= L:
            bad = int(np.flatnonzero(raw.layer >= L)[0])
            raise TraceError(f"{path}: record {int(raw.record_no[bad])} names layer {int(raw.layer[bad])}, but the model has {L} MoE layers (0..{L - 1})")
        if raw.experts.shape[1] != K:
            raise TraceError(f"{path}: records list top-{raw.experts.shape[1]} experts, but the model routes top-{K}")
        if int(raw.experts.max()) >= J:
            bad = int(np.flatnonzero((raw.experts >= J).any(axis=1))[0])
            raise TraceError(f"{path}: record {int(raw.record_no[bad])} names expert {int(raw.experts[bad].max())}, but the model has {J} experts per layer")
        warmup = None
        if lay == "batched":
            raw, warmup, seq_prompt = _as_sequences(raw, batched_prompts, generated_tokens, skip_steps, detect_warmup)
            prompt_of.update(seq_prompt)
            lay_rows = "positions"
        else:
            lay_rows = lay
        logged.update(np.unique(raw.layer).tolist())
        for label in raw.labels:
            if label in seen:
                raise TraceError(
                    f"{path}: request {label} also appears in {seen[label]}; import the files separately "
                    f"or add {FILE_KEY} to --request-key to keep them apart"
                )
            seen[label] = path
        local_prompt = dict(prompt_of)
        if explicit_all is not None:
            local_prompt.update({label: explicit_all for label in raw.labels})
        rows = _rows_for(raw, lay_rows, local_prompt, decode_of)
        # experts in descending gate weight, as the schema wants
        order = np.argsort(-raw.weights, axis=1, kind="stable")
        ex = np.take_along_axis(raw.experts, order, axis=1)
        wt = np.take_along_axis(raw.weights, order, axis=1)
        report.records_read += raw.req.shape[0]
        report.files.append({"name": path.name, "records": int(raw.req.shape[0]), "layout": lay,
                             "token_field": raw.tok_field, "sha256": raw.sha256, "header": raw.meta,
                             "filtered_out": raw.filtered_out, **(warmup or {})})
        for r, label in enumerate(raw.labels):
            idx = np.flatnonzero(raw.req == r)
            t_len = rows.iteration[r].shape[0]
            key = rows.row_in_request[idx] * L + raw.layer[idx]
            srt = np.argsort(key, kind="stable")
            key_s = key[srt]
            dup = np.flatnonzero(key_s[1:] == key_s[:-1])
            if dup.size:
                a, b = idx[srt[dup]], idx[srt[dup + 1]]
                differ = (ex[a] != ex[b]).any(axis=1) | (wt[a] != wt[b]).any(axis=1)
                if differ.any():
                    i = int(np.flatnonzero(differ)[0])
                    tok_row, layer = divmod(int(key_s[dup[i]]), L)
                    hint = ("; a batched engine log, where the token field is the row within an engine "
                            "step? try --layout batched --prompt-tokens N1,N2,..." if lay == "decode" else "")
                    raise TraceError(
                        f"{path}: request {label} has two different records for token row {tok_row}, "
                        f"layer {layer} (records {int(raw.record_no[a[i]])} and {int(raw.record_no[b[i]])}){hint}"
                    )
                report.duplicate_records_dropped += int(dup.size)
            experts = np.full((t_len, L, K), MISSING_EXPERT, np.int16)
            weights = np.zeros((t_len, L, K), np.float16)
            tr, tl = divmod(key_s, L)
            experts[tr, tl] = ex[idx[srt]]
            weights[tr, tl] = wt[idx[srt]]
            missing_masks.append(experts[:, :, 0] == MISSING_EXPERT)
            rid = len(requests)
            p = rows.prompt_tokens[r]
            if p is None:
                unknown_prompt.append(label)
            # generated_tokens counts the tokens the recorded iterations produced: each decode
            # iteration one, and the prefill (when recorded) the first.
            produced = rows.generated[r] + (1 if rows.has_prefill[r] else 0)
            requests.append(RequestInfo(rid, p or 0, produced, rows.has_prefill[r], label=label))
            chunks.append((rows.iteration[r], rows.position[r], experts, weights))
            report.requests.append(RequestReport(
                label=label, file=path.name, layout=lay, prompt_tokens=p,
                generated_tokens=rows.generated[r], has_prefill=rows.has_prefill[r],
                tokens_with_gaps=0, tokens_absent=0, missing_records=0,
            ))
    present = sorted(declared_layers if declared_layers is not None else logged)
    for rep_, missing in zip(report.requests, missing_masks, strict=True):
        # gaps are counted in the layers the logs hold; layers never logged are not gaps
        n_missing = missing[:, present].sum(axis=1)
        rep_.tokens_with_gaps = int(((n_missing > 0) & (n_missing < len(present))).sum())
        rep_.tokens_absent = int((n_missing == len(present)).sum())
        rep_.missing_records = int(n_missing.sum())
    report.layers_logged = present if len(present) < L else None
    counts = [c[0].shape[0] for c in chunks]
    trace = Trace(
        geometry=geometry,
        requests=tuple(requests),
        request_id=np.repeat(np.arange(len(requests), dtype=np.int32), counts),
        iteration=np.concatenate([c[0] for c in chunks]).astype(np.int32),
        position=np.concatenate([c[1] for c in chunks]).astype(np.int32),
        experts=np.concatenate([c[2] for c in chunks]),
        weights=np.concatenate([c[3] for c in chunks]),
        metadata={
            "source": {
                "kind": "routing-jsonl",
                "files": report.files,
                "fields": asdict(fields),
                "layout": layout,
                "prompt_tokens_unknown": unknown_prompt,
                "missing_records": report.missing_records,
                "tokens_with_gaps": report.tokens_with_gaps,
                "tokens_absent": report.tokens_absent,
                "duplicate_records_dropped": report.duplicate_records_dropped,
                "where": dict(where or {}),
            },
            **({LAYERS_LOGGED_KEY: present} if report.layers_logged else {}),
        },
    )
    return trace, report


def check_meta(meta: Mapping, geometry: Geometry, path: Path) -> set[int] | None:
    """Check a log header's geometry against the model's; the layers it says were logged, if any."""
    for key, have in (("top_k", geometry.top_k), ("num_experts", geometry.num_experts),
                      ("num_layers", geometry.num_layers)):
        if key in meta and int(meta[key]) != have:
            raise ConfigError(f"{path}: the log's header says {key}={meta[key]}, but the model geometry "
                              f"({geometry.model_name}) has {have}")
    layers = meta.get("layers_logged")
    if layers is None:
        return None
    if not isinstance(layers, list) or not all(isinstance(v, int) and 0 <= v < geometry.num_layers for v in layers):
        raise TraceError(f"{path}: the header's layers_logged must list layer numbers 0..{geometry.num_layers - 1}")
    return set(layers)


def _as_sequences(raw: _RawLog, prompts: Sequence[int], generated: Sequence[int] | None, skip_steps: int,
                  detect_warmup: bool) -> tuple[_RawLog, dict, dict[str, int]]:
    """A batched log re-keyed by sequence and position; what warm-up was dropped; prompt per label."""
    if len(raw.labels) != 1:
        raise TraceError(f"{raw.path}: a batched log is one engine's stream, but its records name "
                         f"{len(raw.labels)} requests ({', '.join(raw.labels[:3])}, ...); import them separately")
    m = map_batched(raw.layer, raw.tok, raw.weights, prompts, generated, skip_steps=skip_steps,
                    detect_warmup=detect_warmup, where=str(raw.path))
    stem = raw.path.name.split(".")[0]
    labels = [f"{stem}/{i}" for i in range(len(prompts))]
    k = m.keep
    out = replace(raw, labels=labels, req=m.sequence.astype(np.int32), layer=raw.layer[k], tok=m.position,
                  experts=raw.experts[k], weights=raw.weights[k], record_no=raw.record_no[k])
    info = {"warmup_steps_dropped": m.warmup_steps, "warmup_records_dropped": m.warmup_records,
            "engine_steps": m.steps}
    return out, info, dict(zip(labels, (int(p) for p in prompts), strict=True))
