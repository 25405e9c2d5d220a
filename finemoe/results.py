"""The results schema shared by the simulator, the replayer and the plots.

One result file per configuration: a Parquet table with one row per measured request, and in its
schema metadata (JSON) the full configuration, the run summary, per-layer hit rates and a bounded
timeline of engine events. Files are written atomically so an interrupted sweep never leaves a
half-written result; `result_exists` is how sweeps resume.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from finemoe.errors import FinemoeError
from finemoe.files import atomic_path

RESULTS_SCHEMA_VERSION = 1
_META_KEY = b"finemoe_result"

REQUEST_COLUMNS = (
    "request_id",
    "arrival_s",
    "first_token_s",
    "finish_s",
    "prompt_tokens",
    "generated_tokens",
    "ttft_s",  # first_token_s - arrival_s
    "tpot_s",  # (finish_s - first_token_s) / (generated_tokens - 1); NaN for one token
    "e2e_s",  # finish_s - arrival_s
)

# Timeline event fields: lane ("compute", "copy0", "copy1", ...), kind ("dense", "expert",
# "demand", "prefetch"), step, layer, expert (-1 for dense), start_s, end_s, miss (bool).
TIMELINE_FIELDS = ("lane", "kind", "step", "layer", "expert", "start_s", "end_s", "miss")


class ResultError(FinemoeError):
    """A result file is missing, corrupt or not a finemoe result."""


@dataclass
class RunResult:
    """Everything one configuration's run produced.

    config: the full configuration (engine, trace path and hash, policy and params, hardware,
      memory, workload and split, seed) as nested JSON-able dicts.
    summary: flat metrics, e.g. hit_rate, hits, misses, ondemand_loads, stall_s, bytes_h2d,
      prefetch_issued, prefetch_in_time, prefetch_late, prefetch_unused_evicted,
      ttft_p50_s/p90/p99, tpot_p50_s/p90/p99, e2e_p50_s/p90/p99, layer_steps, wall_s.
    """

    config: dict
    summary: dict
    requests: pd.DataFrame  # given as a frame, or as `requests_frame`'s rows: built when first read
    per_layer_hit_rate: list[float] = field(default_factory=list)
    timeline: list[dict] = field(default_factory=list)

    def write(self, path: str | os.PathLike) -> Path:
        return write_result(self, path)


def _get_requests(result: RunResult) -> pd.DataFrame:
    if result._request_rows is not None:
        result._requests, result._request_rows = requests_frame(result._request_rows), None
    return result._requests


def _set_requests(result: RunResult, value) -> None:
    """A list of rows is kept as it is until the frame is read: the oracle's candidates and its local
    search make dozens of runs per instance and read the summaries of all but one (a frame costs a
    third of a tiny run's results)."""
    if isinstance(value, list):
        result._requests, result._request_rows = None, value
    else:
        result._requests, result._request_rows = value, None


RunResult.requests = property(_get_requests, _set_requests)  # (the dataclass's `__init__` sets it)


def latency_summary(requests: pd.DataFrame) -> dict[str, float]:
    """p50/p90/p99 and mean of ttft, tpot and e2e over the measured requests (NaNs ignored)."""
    return latency_stats({m: requests[f"{m}_s"].to_numpy(dtype=float) for m in ("ttft", "tpot", "e2e")})


def latency_stats(times: dict[str, np.ndarray]) -> dict[str, float]:
    """`latency_summary` of per-request ttft, tpot and e2e arrays (seconds, NaN: none)."""
    out: dict[str, float] = {}
    for metric in ("ttft", "tpot", "e2e"):
        values = times[metric]
        values = values[~np.isnan(values)]
        quantiles = percentiles(values.tolist(), (50, 90, 99)) if values.size else (float("nan"),) * 3
        for q, v in zip((50, 90, 99), quantiles, strict=True):
            out[f"{metric}_p{q}_s"] = float(v)
        out[f"{metric}_mean_s"] = float(values.mean()) if values.size else float("nan")
    return out


def percentiles(values: list[float], qs: tuple[int, ...]) -> list[float]:
    """`np.percentile(values, qs)` (its default, linear method) to the last bit, for the few values
    of one run: numpy's call costs a tenth of a millisecond each, and the oracle's local search
    summarises hundreds of runs per instance (tests/test_results.py holds it to numpy's)."""
    s = sorted(values)
    last = len(s) - 1
    out = []
    for q in qs:
        at = last * (q / 100)  # numpy's virtual index, (n - 1) x q
        lo = int(math.floor(at))
        a, b = s[lo], s[min(lo + 1, last)]
        gamma = at - lo
        d = b - a
        out.append(b - d * (1 - gamma) if gamma >= 0.5 else a + d * gamma)  # numpy's `_lerp`
    return out


def request_times(arrival, first_token, finish, generated) -> dict[str, np.ndarray]:
    """ttft, tpot and e2e per request from its timestamps and token count (float arrays; tpot is
    NaN for a request of one token)."""
    arrival, first_token, finish = (np.asarray(a, dtype=float) for a in (arrival, first_token, finish))
    generated = np.asarray(generated)
    decode = np.where(generated > 1, generated - 1, np.nan)
    return {"ttft": first_token - arrival, "tpot": (finish - first_token) / decode, "e2e": finish - arrival}


_INT_REQUEST_COLUMNS = ("request_id", "prompt_tokens", "generated_tokens")


def requests_frame(rows: list[dict]) -> pd.DataFrame:
    """Per-request table from raw timestamps, deriving ttft/tpot/e2e: counts as int64, times as
    float64 (a missing time, None, is NaN). Built from columns in one DataFrame call: a sweep of
    small runs builds thousands, the oracle's local search hundreds per instance (row records and
    `assign` cost four times as much)."""
    cols = {c: np.asarray([r[c] for r in rows], dtype=np.int64 if c in _INT_REQUEST_COLUMNS else float)
            for c in REQUEST_COLUMNS[:6]}
    times = request_times(cols["arrival_s"], cols["first_token_s"], cols["finish_s"], cols["generated_tokens"])
    # In REQUEST_COLUMNS' order already (tests/test_results.py): a `columns=` reindex costs a third more.
    return pd.DataFrame({**cols, "ttft_s": times["ttft"], "tpot_s": times["tpot"], "e2e_s": times["e2e"]})


def write_result(result: RunResult, path: str | os.PathLike) -> Path:
    path = Path(path)
    meta = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "config": result.config,
        "summary": result.summary,
        "per_layer_hit_rate": list(result.per_layer_hit_rate),
        "timeline": list(result.timeline),
    }
    table = pa.Table.from_pandas(result.requests, preserve_index=False)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta, default=_json_default).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_result(path: str | os.PathLike) -> RunResult:
    path = Path(path)
    if not path.exists():
        raise ResultError(f"{path}: no such result file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ResultError(f"{path}: not a readable Parquet result file ({str(exc).splitlines()[0]})") from None
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ResultError(f"{path}: not a finemoe result file (no result metadata)")
    meta = json.loads(raw)
    if meta.get("schema_version", 0) > RESULTS_SCHEMA_VERSION:
        raise ResultError(f"{path}: written by a newer finemoe (results schema v{meta['schema_version']})")
    return RunResult(
        config=meta["config"],
        summary=meta["summary"],
        requests=table.to_pandas(),
        per_layer_hit_rate=meta.get("per_layer_hit_rate", []),
        timeline=meta.get("timeline", []),
    )


def result_exists(path: str | os.PathLike) -> bool:
    """True if `path` holds a complete, readable result (how sweeps decide what to skip)."""
    try:
        read_result(path)
    except ResultError:
        return False
    return True


def collect_result_paths(paths) -> list[Path]:
    """Result files named directly or found (recursively, *.parquet) under directories."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(p.rglob("*.parquet")))
        else:
            out.append(p)
    return out


def summary_frame(paths) -> pd.DataFrame:
    """One row per result file: its summary and the main configuration fields, flattened."""
    rows = []
    for p in collect_result_paths(paths):
        r = read_result(p)
        row = {"path": str(p)}
        row.update(_flatten(r.config))
        row.update(r.summary)
        rows.append(row)
    return pd.DataFrame(rows)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, default=_json_default)
        else:
            out[key] = v
    return out


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
