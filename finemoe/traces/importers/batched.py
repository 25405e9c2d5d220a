"""Engine steps of a routing log, and batched engine steps mapped back to their sequences.

A serving engine that logs from inside its forward pass (vLLM hooks) writes, per engine step, one
record per (layer, row of the step's batch), layer by layer. It knows no request: every record may
carry the same request id, and the token field is the row within the step (0 again every step).
Which row belongs to which sequence follows from the scheduler's order, which this module assumes
and checks (docs/trace-format.md, "batched"):

1. a new step begins wherever (layer, row) does not increase in write order;
2. a step's rows are first one decode token of every running sequence, in admission order, then the
   prompt tokens of newly admitted sequences back to back, in the order of the prompt list;
3. a sequence stops running after its number of decode steps (`generated`, when given); without it
   no sequence ends inside the log, so a step with fewer rows than running sequences is an error.

Leading warm-up and profiling steps (dummy batches) are dropped by count (`skip_steps`) or, when
`detect_warmup`, while a step is uniform (every record's gate weights all equal, what a dummy
input through an untrained-looking router gives) or holds more rows than any real step could
(every prompt token plus one decode token per sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from finemoe.errors import TraceError


def step_index(layer: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Step number per record: a new step begins wherever (layer, row) does not increase."""
    new_step = np.ones(layer.size, bool)
    new_step[1:] = (layer[1:] < layer[:-1]) | ((layer[1:] == layer[:-1]) & (row[1:] <= row[:-1]))
    return np.cumsum(new_step) - 1


@dataclass
class BatchedLayout:
    """Where each kept record of a batched log goes, and what was dropped before it."""

    keep: np.ndarray  # bool [n]: record is not part of a warm-up step
    sequence: np.ndarray  # int64 [kept]: sequence index (order of the prompt list)
    position: np.ndarray  # int64 [kept]: position within its sequence
    warmup_steps: int  # leading steps dropped
    warmup_records: int
    steps: int  # engine steps kept
    decoded: list[int]  # decode steps per sequence


def warmup_steps(step: np.ndarray, row: np.ndarray, weights: np.ndarray, *, skip_steps: int,
                 detect: bool, max_rows: int) -> int:
    """How many leading steps are warm-up: `skip_steps`, then (if `detect`) uniform or impossible ones."""
    n_steps = int(step[-1]) + 1 if step.size else 0
    first = min(skip_steps, n_steps)
    if not detect:
        return first
    starts = np.searchsorted(step, np.arange(n_steps + 1))
    while first < n_steps:
        a, b = starts[first], starts[first + 1]
        w = weights[a:b]
        uniform = bool(np.all(w == w[:, :1]))
        too_many = int(row[a:b].max()) + 1 > max_rows
        if not (uniform or too_many):
            break
        first += 1
    return first


def map_batched(layer: np.ndarray, row: np.ndarray, weights: np.ndarray, prompts: Sequence[int],
                generated: Sequence[int] | None = None, *, skip_steps: int = 0,
                detect_warmup: bool = True, where: str = "") -> BatchedLayout:
    """Assign every record of one batched log (write order) to a sequence and a position."""
    prompts = [int(p) for p in prompts]
    if not prompts or min(prompts) < 1:
        raise TraceError(f"{where}: a batched log needs the prompts' lengths, each at least 1 "
                         "(--prompt-tokens N1,N2,... in admission order)")
    if generated is not None and len(generated) != len(prompts):
        raise TraceError(f"{where}: {len(generated)} decode lengths given for {len(prompts)} prompts")
    step = step_index(layer, row)
    first = warmup_steps(step, row, weights, skip_steps=skip_steps, detect=detect_warmup,
                         max_rows=sum(prompts) + len(prompts))
    keep = step >= first
    step, row = step[keep] - first, row[keep]
    n_steps = int(step[-1]) + 1 if step.size else 0
    if not n_steps:
        raise TraceError(f"{where}: every engine step was dropped as warm-up ({first} steps)")
    starts = np.searchsorted(step, np.arange(n_steps + 1))
    seq = np.empty(row.size, np.int64)
    pos = np.empty(row.size, np.int64)
    running: list[int] = []
    decoded = [0] * len(prompts)
    admitted = 0
    for s in range(n_steps):
        a, b = starts[s], starts[s + 1]
        if generated is not None:
            running = [q for q in running if decoded[q] < generated[q]]
        rows = int(row[a:b].max()) + 1
        n_dec = len(running)
        if rows < n_dec:
            hint = ("more sequences ended than --generated-tokens says" if generated is not None else
                    "which sequences ended is not in the log: give --generated-tokens D1,D2,...")
            raise TraceError(f"{where}: engine step {s + first} holds {rows} rows but {n_dec} sequences "
                             f"are running; {hint}")
        # row -> (sequence, position) for this step: decode rows first, then new prompts back to back
        row_seq = np.empty(rows, np.int64)
        row_pos = np.empty(rows, np.int64)
        for i, q in enumerate(running):
            row_seq[i], row_pos[i] = q, prompts[q] + decoded[q]
            decoded[q] += 1
        at = n_dec
        while at < rows:
            if admitted == len(prompts) or at + prompts[admitted] > rows:
                left = prompts[admitted:admitted + 3]
                raise TraceError(
                    f"{where}: engine step {s + first} holds {rows - n_dec} rows after its {n_dec} running "
                    f"sequences, which are not the prompts of the next sequences (lengths "
                    f"{', '.join(map(str, left)) or 'none left'}); check --prompt-tokens, or drop warm-up "
                    "steps with --skip-steps"
                )
            q, p = admitted, prompts[admitted]
            row_seq[at:at + p], row_pos[at:at + p] = q, np.arange(p)
            running.append(q)
            admitted += 1
            at += p
        seq[a:b], pos[a:b] = row_seq[row[a:b]], row_pos[row[a:b]]
    if admitted < len(prompts):
        raise TraceError(f"{where}: the log admits {admitted} of the {len(prompts)} prompts given")
    if generated is not None:
        short = [q for q in range(len(prompts)) if decoded[q] != generated[q]]
        if short:
            q = short[0]
            raise TraceError(f"{where}: sequence {q} ran {decoded[q]} decode steps in the log, "
                             f"--generated-tokens says {generated[q]}")
    return BatchedLayout(keep=keep, sequence=seq, position=pos, warmup_steps=first,
                         warmup_records=int((~keep).sum()), steps=n_steps, decoded=decoded)
