"""SGLang's expert distribution recorder in per-token mode
(`--expert-distribution-recorder-mode per_token`, sglang/srt/eplb/expert_distribution.py).

Its dump, `expert_distribution_recorder_{time}_{rank}.pt` (torch.save), is a dict:
`records`, one per forward pass: `forward_pass_id`, `rank`, `gatherer_key`, `input_ids` and
`positions` (one per token of the pass), `extend_seq_lens` (a prefill/extend pass: the new tokens
of each sequence, back to back; None in a decode pass), `forward_mode`, and `topk_ids_of_layer`, an
int tensor [num_layers, num_tokens, 8] of physical expert ids (-1 past the model's top-k); and
`last_physical_to_logical_map` [num_layers, num_physical_experts]. The same dict saved as JSON
(tensors as nested lists) is read too.

The records carry no request id (the recorder leaves `rids` out), so sequences are followed by
the scheduler's order and checked against the positions: an extend pass admits one new sequence
per `extend_seq_lens` entry, whose first position must be 0 (run without chunked prefill and
prefix caching, or its prompt is partly missing); a decode pass holds one token per running
sequence in admission order, and a running sequence whose row shows another position than its
next one is taken as finished. Physical ids go through the map to logical experts. The dump has
no gate weights and no router probabilities.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finemoe.errors import TraceError
from finemoe.traces.geometry import Geometry
from finemoe.traces.importers.assemble import RoutedSequence, build_trace
from finemoe.traces.schema import MISSING_EXPERT, Trace

KIND = "sglang-per-token"
LACKS = "gate weights, router probabilities, request ids (sequences followed by batch order and positions)"


def sniff(path: Path) -> bool:
    """A .pt file, or JSON naming topk_ids_of_layer."""
    if path.suffix == ".pt":
        return True
    try:
        with open(path, "rb") as fh:
            return b'"topk_ids_of_layer"' in fh.read(1 << 16)
    except OSError:
        return False


def _load(path: Path) -> dict:
    if path.suffix == ".pt":
        import torch

        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a foreign or damaged pickle can fail in any way
            raise TraceError(f"{path}: not a readable torch dump ({type(exc).__name__})") from None
    else:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TraceError(f"{path}: not a readable JSON dump ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise TraceError(f"{path}: not an expert distribution dump (no 'records' list; record in per_token mode)")
    return data


def _array(value) -> np.ndarray:
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value, dtype=np.int64)


def read_sglang_dump(path: Path, geometry: Geometry) -> list[RoutedSequence]:
    data = _load(path)
    L, K = geometry.num_layers, geometry.top_k
    mapping = data.get("last_physical_to_logical_map")
    mapping = None if mapping is None else _array(mapping)
    records = sorted(data["records"], key=lambda r: int(r.get("forward_pass_id", 0)))
    tokens: list[list[np.ndarray]] = []  # per sequence: routing [L, K] per token
    next_pos: list[int] = []
    prompts: list[int] = []
    running: list[int] = []
    for rec in records:
        fid = rec.get("forward_pass_id")
        where = f"{path.name} forward pass {fid}"
        try:
            ids = _array(rec["topk_ids_of_layer"])
            pos = _array(rec["positions"]).reshape(-1)
        except KeyError as exc:
            raise TraceError(f"{where}: the record lacks {exc.args[0]!r} (dump it in per_token mode)") from None
        if ids.ndim != 3 or ids.shape[0] != L or ids.shape[1] != pos.size:
            raise TraceError(f"{where}: topk_ids_of_layer has shape {list(ids.shape)}; expected [{L} layers, "
                             f"{pos.size} tokens, top-k]")
        if ids.shape[2] < K or (ids[:, :, K:] != MISSING_EXPERT).any():
            raise TraceError(f"{where}: its top-k ids do not fit top-{K} (give the model that wrote it)")
        ids = ids[:, :, :K]
        if mapping is not None:
            if mapping.shape[0] != L or ids.max(initial=-1) >= mapping.shape[1]:
                raise TraceError(f"{where}: a physical expert id is outside last_physical_to_logical_map")
            ids = np.where(ids >= 0, mapping[np.arange(L)[:, None, None], np.maximum(ids, 0)], ids)
        per_token = ids.transpose(1, 0, 2)  # [tokens, L, K]
        lens = rec.get("extend_seq_lens")
        if lens is not None:  # extend: new sequences back to back
            lens = _array(lens).reshape(-1).tolist()
            if sum(lens) != pos.size:
                raise TraceError(f"{where}: extend_seq_lens sum to {sum(lens)} but the pass holds {pos.size} tokens")
            at = 0
            for n in lens:
                if pos[at] != 0 or (np.diff(pos[at:at + n]) != 1).any():
                    raise TraceError(f"{where}: a new sequence starts at position {int(pos[at])}, not 0 with "
                                     "consecutive positions (chunked prefill or a prefix cache hit); record "
                                     "with --chunked-prefill-size -1 and --disable-radix-cache")
                tokens.append(list(per_token[at:at + n]))
                prompts.append(n)
                next_pos.append(n)
                running.append(len(tokens) - 1)
                at += n
            continue
        still, row = [], 0  # decode: one row per running sequence, in admission order
        for q in running:
            if row < pos.size and pos[row] == next_pos[q]:
                tokens[q].append(per_token[row])
                next_pos[q] += 1
                still.append(q)
                row += 1
        if row != pos.size:
            raise TraceError(f"{where}: decode row {row} at position {int(pos[row])} continues no running "
                             "sequence (the dump must start with the prompts' extend passes)")
        running = still
    return [RoutedSequence(f"{path.stem}/{q}", prompts[q], np.stack(t)) for q, t in enumerate(tokens)]


def import_sglang_dump(paths, geometry: Geometry) -> Trace:
    paths = [Path(p) for p in paths]
    seqs = [s for p in paths for s in read_sglang_dump(p, geometry)]
    return build_trace(seqs, geometry, kind=KIND, files=paths, lacks=LACKS)
