"""Write a trace piece by piece so an interrupted collection still leaves a valid trace.

Pieces go as `part-NNNNN.parquet` files into a hidden temporary folder beside the target (a
caller may also hold recent pieces in memory and hand them to `finish`). `finish` turns them into
the trace the user named, atomically: a `.parquet` target becomes one consolidated
file, any other name a directory of part files (which `read_trace` reads as one trace). Until
then the target is untouched, so a crash never leaves a half-written trace under its name.

The temporary folder's name carries the writer's process id; a new writer removes the folders
of writers that are gone (killed by SIGKILL or the OOM killer, whose unflushed requests are lost
anyway) for the same target, and leaves those of live ones alone.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from finemoe.errors import TraceError
from finemoe.files import ensure_dir, glob_escape, make_temp_dir, replace_dir
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
        ensure_dir(self.target.parent)
        remove_stale_partials(self.target)
        self.tmpdir = make_temp_dir(self.target.parent, f"{partial_prefix(self.target)}{os.getpid()}-")
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
        return replace_dir(self.tmpdir, self.target)

    def discard(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def partial_prefix(target: Path) -> str:
    """`.<name>.partial-`: the start of a writer's temporary folder for `target`."""
    return f".{target.name}.partial-"


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove the temporary folders of writers to `target` whose process is gone; returns them."""
    prefix = partial_prefix(target)
    owner = re.compile(re.escape(prefix) + r"(\d+)-")
    removed = []
    for folder in target.parent.glob(f"{glob_escape(prefix)}*"):
        found = owner.match(folder.name)
        if folder.is_dir() and not (found and _alive(int(found.group(1)))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another writer of this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
