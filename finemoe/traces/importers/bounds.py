"""What one routing record may make the importer allocate.

A request becomes one token row per index its token field reaches (absent indices are stored as
missing), so a single corrupt record (`"token_idx": 3000000000`) would make the importer allocate
rows for every index below it: tens of GB, or a MemoryError. A request may span at most
`ROWS_PER_RECORD` token rows per record it has. A complete log has one record per (token, layer),
so this leaves room for logs that record one layer only and still skip half their tokens, while
keeping a trace's size proportional to the log's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finemoe.errors import ConfigError, TraceError

ROWS_PER_RECORD = 2
MAX_ROWS = 2**31 - 1  # positions are stored as int32


def check_token_span(path: Path, tok: np.ndarray, req: np.ndarray, labels: list[str],
                     record_no: np.ndarray, field: str) -> None:
    """TraceError naming file, line and request of the first record whose token index is out of bounds.

    `tok` is the token (or position) field of each record, `req` its request code (an index into
    `labels`), `record_no` its 1-based record number in the file. Vectorised: one bincount, one compare.
    """
    if tok.size == 0:
        return
    records = np.bincount(req, minlength=len(labels))
    limit = np.minimum(records * ROWS_PER_RECORD, MAX_ROWS)
    over = np.flatnonzero(tok >= limit[req])
    if over.size == 0:
        return
    i = int(over[0])
    r = int(req[i])
    raise TraceError(
        f"{path}: line {line_of_record(path, int(record_no[i]))} (record {int(record_no[i])}) gives {field!r} "
        f"{int(tok[i]):,}, but its request {labels[r] or '(unnamed)'} has {int(records[r]):,} record(s), "
        f"which can fill at most {int(limit[r]):,} token rows; the field is corrupt or is not a token index "
        f"({over.size} such record(s))"
    )


def line_of_record(path: Path, record: int) -> int:
    """The line of the `record`-th (1-based) non-blank line: blank lines hold no record. Error path only."""
    seen = 0
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                seen += 1
                if seen == record:
                    return lineno
    return record


def check_lengths(value, option: str):
    """`value` (None, a length, a list of lengths or label -> length) with every length in [0, MAX_ROWS].

    Positions are stored as int32, so a prompt longer than that is a typo that would otherwise end
    in numpy's OverflowError deep in the importer.
    """
    lengths = value.values() if isinstance(value, dict) else [value] if isinstance(value, int) else value or ()
    for n in lengths:
        if not 0 <= n <= MAX_ROWS:
            raise ConfigError(f"{option}: {n:,} tokens is not a length this format stores (0 to {MAX_ROWS:,})")
    return value
