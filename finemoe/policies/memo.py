"""Results a policy computed from content alone (the trace, the history, its parameters), remembered
under a hash of that content: what every budget and hardware of a sweep can share (FineMoE's map
matches, ProMoE's trained predictors and their outputs, MoE-Infinity's matches).

Per process, the last few in memory. Within `stored_in(folder)` (a sweep's `predictions/` folder
beside its results) also on disk, one `.npz` of plain arrays per value (no pickles: a results folder
may come from someone else), written atomically under a lock so that a sweep's workers compute
each value once between them, and a later sweep into the same folder reads them. A file that
cannot be read is computed again; one that cannot be written is not kept (the run goes on).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from finemoe.errors import FinemoeError

T = TypeVar("T")
Arrays = dict[str, np.ndarray]

_folder: Path | None = None  # where values are also kept, while `stored_in` holds


def digest(*parts) -> str:
    """A content hash of arrays (their dtype, shape and bytes), strings and numbers."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(f"{part.dtype}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(repr(part).encode())
        h.update(b"|")
    return h.hexdigest()


@contextmanager
def stored_in(folder: str | Path | None) -> Iterator[None]:
    """Keep values on disk in `folder` too for the block (None: memory only)."""
    global _folder
    before, _folder = _folder, None if folder is None else Path(folder)
    try:
        yield
    finally:
        _folder = before


_NARROW_INTS = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32)
_DTYPES = "__dtypes__"  # a file's entry naming the arrays `narrowed` stored in another dtype, and theirs


def narrowed(arrays: Arrays) -> Arrays:
    """The arrays for a file, each integer array in the narrowest integer type that holds its values
    and each float64 array whose values are all float32 values as float32 (exactly the same values,
    in half the bytes or less: a paper-size trace's FineMoE hooks are 61 MB as they are)."""
    out, dtypes = {}, {}
    for name, a in arrays.items():
        small = a
        if a.size and a.dtype.kind in "iu":
            lo, hi = int(a.min()), int(a.max())
            fits = [t for t in _NARROW_INTS if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max]
            if fits and np.dtype(fits[0]).itemsize < a.dtype.itemsize:
                small = a.astype(fits[0])
        elif a.size and a.dtype == np.float64:
            with np.errstate(over="ignore", invalid="ignore"):
                as32 = a.astype(np.float32)
            if np.array_equal(as32.astype(np.float64), a, equal_nan=True):
                small = as32
        if small.dtype != a.dtype:
            dtypes[name] = a.dtype.str
        out[name] = small
    if dtypes:
        out[_DTYPES] = np.array(json.dumps(dtypes))
    return out


def widened(arrays: Arrays) -> Arrays:
    """`narrowed`'s arrays in their own dtypes again."""
    dtypes = json.loads(str(arrays.pop(_DTYPES))) if _DTYPES in arrays else {}
    return {name: a.astype(dtypes[name]) if name in dtypes else a for name, a in arrays.items()}


class ContentMemo(Generic[T]):
    """The last `kept` values by content hash, least recently used dropped first; on disk too (as
    `name-<hash>.npz`) within `stored_in`, for values `to_arrays` / `from_arrays` convert."""

    def __init__(self, kept: int, name: str, to_arrays: Callable[[T], Arrays], from_arrays: Callable[[Arrays], T]):
        self.kept, self.name = kept, name
        self._to_arrays, self._from_arrays = to_arrays, from_arrays
        self._values: OrderedDict[str, T] = OrderedDict()
        self.computed = 0  # values computed here (not read from memory or disk)

    def get(self, key: str, compute: Callable[[], T]) -> T:
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
            return value
        value = self._from_disk_or(key, compute) if _folder is not None else self._compute(compute)
        self._values[key] = value
        while len(self._values) > self.kept:
            self._values.popitem(last=False)
        return value

    def empty_like(self) -> ContentMemo[T]:
        """A memo like this one with nothing in memory and nothing computed yet (a test's own)."""
        return ContentMemo(self.kept, self.name, self._to_arrays, self._from_arrays)

    def held(self, key: str) -> T | None:
        """The value kept in memory under `key`, or None (nothing computed or read)."""
        return self._values.get(key)

    def _compute(self, compute: Callable[[], T]) -> T:
        self.computed += 1
        return compute()

    def _from_disk_or(self, key: str, compute: Callable[[], T]) -> T:
        from finemoe.files import atomic_write_bytes, ensure_dir, locked

        path = _folder / f"{self.name}-{key}.npz"
        with ExitStack() as held:
            try:
                ensure_dir(_folder)
                held.enter_context(locked(path.with_suffix(".lock")))  # a sweep's workers take turns
            except (FinemoeError, OSError):
                return self._compute(compute)  # a folder it cannot write to: memory only
            value = self._read(path)
            if value is None:
                value = self._compute(compute)
                buffer = io.BytesIO()
                np.savez(buffer, **narrowed(self._to_arrays(value)))
                try:
                    atomic_write_bytes(path, buffer.getvalue())
                except (FinemoeError, OSError):
                    pass  # a full disk: not kept, the run goes on
            return value

    def _read(self, path: Path) -> T | None:
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return self._from_arrays(widened({k: data[k] for k in data.files}))
        except Exception:  # noqa: BLE001 - a corrupt or foreign file: computed again and replaced
            return None

    def clear(self) -> None:
        self._values.clear()
