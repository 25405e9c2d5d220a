"""Write a trace piece by piece so an interrupted collection still leaves a valid trace.

Pieces go as `part-NNNNN.parquet` files into a hidden temporary folder beside the target. `finish`
turns them into the trace the user named, atomically: a `.parquet` target becomes one consolidated
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

    def finish(self, *, metadata_update: dict | None = None) -> Path | None:
        """Publish the parts under the target name; None (and nothing written) when there are none."""
        if self.num_parts == 0:
            self.discard()
            return None
        if self.target.suffix == ".parquet":
            trace = read_trace(self.tmpdir)
            if metadata_update:
                trace.metadata = {**trace.metadata, **metadata_update}
            write_trace(trace, self.target)
            self.discard()
            return self.target
        if metadata_update:
            first = self.tmpdir / "part-00000.parquet"
            trace = read_trace(first)
            trace.metadata = {**trace.metadata, **metadata_update}
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
