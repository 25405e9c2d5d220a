"""`finemoe import --inspect LOG`: what a log looks like to the importer, so a user can map a new format.

It shows the header, the first records, the fields found (and which of them the importer's field
names would take), and the layout `auto` would pick with the reason, reading only the start of
the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from itertools import islice
from pathlib import Path

from finemoe.errors import TraceError
from finemoe.traces.importers import route_trace
from finemoe.traces.importers.jsonl import FieldMap, read_head

SAMPLE = 50_000  # records looked at to guess the layout (a prefill can be thousands)


def inspect_log(path: str | Path, fields: FieldMap | None = None, where: Mapping[str, str] | None = None,
                show: int = 5) -> list[str]:
    path = Path(path)
    fields = fields or FieldMap()
    if not path.is_file():
        raise TraceError(f"{path}: no such routing log")
    if route_trace.sniff(path):
        head = route_trace.read_header(path)
        with open(path) as fh:
            body = list(islice((x.rstrip("\n") for x in fh if not x.startswith("#")), show + 1))
        return [f"{path.name}: route_trace v1 CSV (--format route-trace): {head.arch}, {head.num_layers} layers x "
                f"{head.num_experts} experts, top-{head.top_k}; per-layer expert bytes "
                f"{min(head.expert_bytes):,}..{max(head.expert_bytes):,}", *body,
                "the residency column is the engine's own cache hit per access; it is kept"]
    head = read_head(path, where)
    out = [f"{path.name}: JSON Lines"]
    if head.meta:
        out.append(f"header ({head.header_records} meta record(s)): {json.dumps(head.meta)[:300]}")
    records = []
    with open(path, "rb") as fh:
        fh.seek(head.body_offset)
        for line in fh:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if isinstance(rec, dict) and rec.get("type") != "meta" and all(str(rec.get(k)) == v for k, v in (where or {}).items()):
                records.append(rec)
            if len(records) >= SAMPLE:
                break
    out.append("first records:")
    out += ["  " + json.dumps(r)[:200] for r in records[:show]]
    found = sorted({k for r in records for k in r})
    out.append(f"fields found: {', '.join(found)}")
    roles = {"request key": fields.request_key, "token": (fields.token_key,), "position": (fields.position_key,),
             "layer": (fields.layer_key,), "experts": (fields.experts_key,), "weights": (fields.weights_key,)}
    for role, names in roles.items():
        have = [n for n in names if n in found or n == "@file"]
        out.append(f"  {role:<11} {','.join(names)}: {'found' if len(have) == len(names) else 'NOT found'}")
    types = sorted({str(r.get("type")) for r in records if "type" in r})
    if types:
        out.append(f"record types: {', '.join(types)} (filter with --where type=...)")
    out.append("layout: " + _guess_layout(records, fields))
    return out


def _guess_layout(records: list[dict], fields: FieldMap) -> str:
    keys = [k for k in fields.request_key if k != "@file"]
    tok = fields.token_key if records and fields.token_key in records[0] else fields.position_key
    pairs, repeats, requests = set(), 0, set()
    for r in records:
        req = tuple(str(r.get(k)) for k in keys)
        requests.add(req)
        key = (req, r.get(fields.layer_key), r.get(tok))
        repeats += key in pairs
        pairs.add(key)
    if tok == fields.token_key and not repeats:
        return f"decode ({tok!r} present and no (request, layer, {tok}) repeats in the first {len(records)} records)"
    if tok == fields.token_key:
        return (f"batched: ({fields.layer_key}, {tok}) repeats {repeats} time(s) in {len(requests)} request(s), so "
                f"{tok!r} is the row within an engine step; --layout batched --prompt-tokens N1,N2,... "
                "(auto would take decode and fail on the repeats)")
    if repeats:
        return f"steps ({tok!r} repeats per layer within a request: it restarts every engine step)"
    return f"positions ({tok!r} never repeats; give --prompt-tokens, the log cannot show where prompts end)"
