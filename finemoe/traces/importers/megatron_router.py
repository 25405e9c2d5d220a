"""Megatron-LM's router trace (`RouterTracer`, Megatron-LM pull request #5220,
`--moe-routing-trace-*`): `router_trace_rank{R}.jsonl`, one JSON record per (step, layer, rank):

    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 24, "topk": 2, "top_indices": [[5, 1], [0, 7], ...]}

`top_indices` holds the step's tokens in Megatron's activation order, sequence-first ([s, b]
flattened: token i is sequence i mod b at position i div b); records of multi-token-prediction
heads (`block` "mtp") are not routing of the model's layers and are left out. In inference a step
is one forward pass: step 0 the prefill of a batch of equal-length prompts, each later step one
decode token per sequence; so the batch is the token count of step 1 (or step 0's tokens /
--prompt-tokens), and every sequence runs every step (static batching). Layer numbers are the
decoder layers' indices; a log whose layers run 1..num_layers is taken as 1-based. The trace has
no gate weights, no router probabilities and no request identity beyond the batch row; one file
(rank) is one batch, and layers it never names are recorded as not logged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finemoe.errors import TraceError
from finemoe.traces.geometry import Geometry
from finemoe.traces.importers.assemble import RoutedSequence, build_trace, logged_layers
from finemoe.traces.schema import MISSING_EXPERT, Trace

KIND = "megatron-router-trace"
LACKS = "gate weights, router probabilities, request identity (sequences are batch rows), variable lengths"


def sniff(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = fh.readline()
        return '"top_indices"' in first and '"step"' in first
    except OSError:
        return False


def _records(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read it as text ({exc})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError
            step, layer = int(rec["step"]), int(rec["layer"])
            ids = np.asarray(rec["top_indices"], np.int64)
        except (ValueError, KeyError, TypeError):
            raise TraceError(f"{path}: line {n} is not a router trace record (step, layer, top_indices)") from None
        if rec.get("block", "decoder") != "decoder":
            continue
        out.append({"step": step, "layer": layer, "ids": ids, "line": n})
    if not out:
        raise TraceError(f"{path}: file holds no decoder router records")
    return out


def read_router_trace(path: Path, geometry: Geometry, prompt_tokens: int | None = None) -> list[RoutedSequence]:
    """One file's batch as routed sequences (one per batch row)."""
    L, K = geometry.num_layers, geometry.top_k
    recs = _records(path)
    layers = [r["layer"] for r in recs]
    shift = 1 if min(layers) >= 1 and max(layers) == L else 0  # 1-based layer numbers
    steps: dict[int, dict[int, np.ndarray]] = {}
    for r in recs:
        layer, ids = r["layer"] - shift, r["ids"]
        if not 0 <= layer < L:
            raise TraceError(f"{path}: line {r['line']} names layer {r['layer']}, outside the model's {L} layers")
        if ids.ndim != 2 or ids.shape[1] != K:
            raise TraceError(f"{path}: line {r['line']} holds top-{ids.shape[-1] if ids.ndim else 0} indices; "
                             f"the model routes top-{K}")
        if layer in steps.setdefault(r["step"], {}):
            raise TraceError(f"{path}: line {r['line']} repeats layer {r['layer']} of step {r['step']}")
        steps[r["step"]][layer] = ids
    order = sorted(steps)
    counts = [{v.shape[0] for v in steps[s].values()} for s in order]
    for s, c in zip(order, counts, strict=True):
        if len(c) != 1:
            raise TraceError(f"{path}: step {s}'s layers hold different token counts {sorted(c)}")
    n_first = next(iter(counts[0]))
    if prompt_tokens:
        if n_first % prompt_tokens:
            raise TraceError(f"{path}: step {order[0]} holds {n_first} tokens, not a whole number of "
                             f"{prompt_tokens}-token prompts")
        batch = n_first // prompt_tokens
    elif len(order) > 1:
        batch = next(iter(counts[1]))
    else:
        batch = 1
    if batch < 1 or n_first % batch:
        raise TraceError(f"{path}: step {order[0]} holds {n_first} tokens, not {batch} equal prompts (the batch "
                         f"of step {order[1] if len(order) > 1 else order[0]}); give --prompt-tokens")
    prompt = n_first // batch
    for s, c in zip(order[1:], counts[1:], strict=True):
        if c != {batch}:
            raise TraceError(f"{path}: step {s} holds {next(iter(c))} tokens; every decode step of a batch of {batch} "
                             f"holds {batch}")
    total = prompt + len(order) - 1
    experts = np.full((batch, total, L, K), MISSING_EXPERT, np.int64)
    for i, s in enumerate(order):
        for layer, ids in steps[s].items():
            if i == 0:  # [s, b] flattened: token j is sequence j % b at position j // b
                experts[:, :prompt, layer] = ids.reshape(prompt, batch, K).transpose(1, 0, 2)
            else:
                experts[:, prompt + i - 1, layer] = ids
    return [RoutedSequence(f"{path.stem}/{b}", prompt, experts[b]) for b in range(batch)]


def import_router_trace(paths, geometry: Geometry, prompt_tokens: int | None = None) -> Trace:
    paths = [Path(p) for p in paths]
    seqs = [s for p in paths for s in read_router_trace(p, geometry, prompt_tokens)]
    return build_trace(seqs, geometry, kind=KIND, files=paths, lacks=LACKS, layers_logged=logged_layers(seqs))
