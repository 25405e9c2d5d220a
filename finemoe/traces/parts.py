"""Write a trace piece by piece so an interrupted collection still leaves a valid trace.

Pieces go as `part-NNNNN.parquet` files into a hidden temporary folder beside the target (a
caller may also hold recent pieces in memory and hand them to `finish`). `finish` turns them into
the trace the user named, atomically: a `.parquet` target becomes one consolidated
file, any other name a directory of part files (which `read_trace` reads as one trace). Until
then the target is untouched, so a crash never leaves a half-written trace under its name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from finemoe.errors import TraceError
from finemoe.traces.io import read_trace, write_trace
from finemoe.traces.schema import Trace


def concat_traces(pieces: list[Trace], metadata: dict | None = None) -> Trace:
    """Pieces of one trace (same geometry, disjoint requests, in order) as one trace."""
    import numpy as np

    def cat(name):
        arrays = [getattr(p, name) for p in pieces]
        return None if any(a is None for a in arrays) else np.concatenate(arrays)

    first = pieces[0]
    return Trace(
        geometry=first.geometry,
        requests=tuple(r for p in pieces for r in p.requests),
        **{name: cat(name) for name in ("request_id", "iteration", "position", "experts", "weights",
                                        "router_probs", "semantic_key", "spec_experts", "spec_weights")},
        metadata=dict(first.metadata if metadata is None else metadata),
    )


class PartWriter:
    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        if self.target.exists() and self.target.is_dir() != (self.target.suffix != ".parquet"):
            kind = "directory" if self.target.is_dir() else "file"
            raise TraceError(f"{self.target}: exists as a {kind}; choose another output name")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        self.num_parts = 0
        self.num_requests = 0

    def write(self, piece: Trace) -> Path:
        """Add one piece (whole requests only); it is on disk, valid, when this returns."""
        path = write_trace(piece, self.tmpdir / f"part-{self.num_parts:05d}.parquet")
        self.num_parts += 1
        self.num_requests += len(piece.requests)
        return path

    def finish(self, pending: list[Trace] = (), *, metadata_update: dict | None = None) -> Path | None:
        """Publish the parts written so far plus `pending` pieces under the target name.

        Returns None (and writes nothing) when there is nothing to publish.
        """
        pending = list(pending)
        if self.num_parts == 0 and not pending:
            self.discard()
            return None
        on_disk = [read_trace(self.tmpdir)] if self.num_parts else []
        metadata = {**(on_disk + pending)[0].metadata, **(metadata_update or {})}
        if self.target.suffix == ".parquet":
            write_trace(concat_traces(on_disk + pending, metadata), self.target)
            self.discard()
            return self.target
        if pending:
            self.write(concat_traces(pending, metadata))
        if on_disk and metadata_update:  # a directory trace's metadata is its first part's
            first = self.tmpdir / "part-00000.parquet"
            trace = read_trace(first)
            trace.metadata = metadata
            write_trace(trace, first)
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.target, old)
        os.replace(self.tmpdir, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)
