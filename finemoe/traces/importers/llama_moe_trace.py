"""llama.cpp's `moe-trace` CSV (examples/moe-trace, llama.cpp pull request #28544).

What it documents: one `layer,expert` CSV row per routed activation, for a prompt evaluation plus a
short greedy continuation, read from the `ffn_moe_topk` id tensors of each MoE layer of each
ubatch, written in execution order (`MOE_TRACE_OUT`, default moe_trace.csv). So within a ubatch
the rows go layer by layer; a layer's rows are its tokens in order, each token's top-k ids
together. A new ubatch starts where the layer number wraps around (goes down or repeats after
other layers); its tokens per layer are the layer's rows / top-k. A header line `layer,expert` is
optional.

One file is one request: the leading ubatches with more than one token are the prompt (its
prefill), every ubatch after them one decode token. A prompt of a single token cannot be told from
a decode step (give --prompt-tokens). The CSV has no gate weights, no router probabilities, no
request boundaries (one request per file) and no positions beyond the row order; layers it never
names are recorded as not logged. With one layer in the file its ubatches cannot be told apart:
then every top-k rows are one token and --prompt-tokens says where the prompt ends.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finemoe.errors import TraceError
from finemoe.traces.geometry import Geometry
from finemoe.traces.importers.assemble import RoutedSequence, build_trace, logged_layers
from finemoe.traces.schema import MISSING_EXPERT, Trace

KIND = "llama.cpp-moe-trace"
HEADER = "layer,expert"
LACKS = "gate weights, router probabilities, request boundaries (one request per file), positions"


def _rows(path: Path) -> np.ndarray:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read it as text ({exc})") from None
    start = 1 if lines and lines[0].strip().replace(" ", "") == HEADER else 0
    out = []
    for n, line in enumerate(lines[start:], start + 1):
        if not line.strip():
            continue
        parts = line.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            out.append((int(parts[0]), int(parts[1])))
        except ValueError:
            raise TraceError(f"{path}: line {n} is not 'layer,expert' with two whole numbers: {line.strip()[:40]!r}") from None
    if not out:
        raise TraceError(f"{path}: file holds no layer,expert rows")
    return np.asarray(out, np.int64)


def sniff(path: Path) -> bool:
    """A first line `layer,expert`, or two comma-separated whole numbers."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = fh.readline().strip().replace(" ", "")
    except OSError:
        return False
    parts = first.split(",")
    return first == HEADER or (len(parts) == 2 and all(p.isdigit() for p in parts))


def read_moe_trace(path: Path, geometry: Geometry, prompt_tokens: int | None = None) -> RoutedSequence:
    """The file's ubatches as one request's tokens."""
    rows = _rows(path)
    layer, expert = rows[:, 0], rows[:, 1]
    L, K = geometry.num_layers, geometry.top_k
    if layer.min() < 0 or layer.max() >= L:
        raise TraceError(f"{path}: names layer {int(layer.max() if layer.max() >= L else layer.min())}, "
                         f"outside the model's 0..{L - 1}")
    if np.unique(layer).size == 1 and prompt_tokens is None:
        raise TraceError(f"{path}: only layer {int(layer[0])} is in the file, so its ubatches (prompt or decode) "
                         "cannot be told apart: give --prompt-tokens N")
    # runs of one layer; a ubatch ends where the next run's layer is not above the last one
    run_start = np.flatnonzero(np.r_[True, layer[1:] != layer[:-1]])
    run_len = np.diff(np.r_[run_start, layer.size])
    run_layer = layer[run_start]
    new_ubatch = np.r_[True, run_layer[1:] <= run_layer[:-1]]
    tokens: list[np.ndarray] = []
    sizes: list[int] = []
    ub = np.cumsum(new_ubatch) - 1
    for u in range(int(ub[-1]) + 1):
        runs = np.flatnonzero(ub == u)
        lens = run_len[runs]
        if (lens % K).any() or len(set(lens.tolist())) != 1:
            raise TraceError(f"{path}: ubatch {u} (from line {int(run_start[runs[0]]) + 1} of the rows) has "
                             f"layer runs of {sorted(set(lens.tolist()))} rows; each layer of a ubatch must "
                             f"hold the same number of tokens x top-{K}")
        n = int(lens[0]) // K
        block = np.full((n, L, K), MISSING_EXPERT, np.int64)
        for r in runs:
            a = int(run_start[r])
            block[:, int(run_layer[r])] = expert[a:a + n * K].reshape(n, K)
        tokens.append(block)
        sizes.append(n)
    experts = np.concatenate(tokens)
    if prompt_tokens is None:
        first_decode = next((i for i, n in enumerate(sizes) if n == 1), len(sizes))
        prompt_tokens = sum(sizes[:first_decode])
    elif prompt_tokens > experts.shape[0]:
        raise TraceError(f"{path}: --prompt-tokens {prompt_tokens} is more than the {experts.shape[0]} tokens "
                         "the file holds")
    return RoutedSequence(path.stem, int(prompt_tokens), experts)


def import_moe_trace(paths, geometry: Geometry, prompt_tokens: int | None = None) -> Trace:
    paths = [Path(p) for p in paths]
    seqs = [read_moe_trace(p, geometry, prompt_tokens) for p in paths]
    return build_trace(seqs, geometry, kind=KIND, files=paths, lacks=LACKS, layers_logged=logged_layers(seqs))
