"""Writing outputs: atomically, with the umask's permissions, and with one sentence when it fails.

Every file finemoe writes goes through here. A result appears under its name whole or not at all
(a temporary file beside it, then a rename), so a full disk or a kill never leaves a half-written
file under the user's name, and the temporary is removed on any failure. Files are created with
mode 0666 and folders 0777, minus the umask, like any other tool's output (mkstemp's 0600 would
hide results from the group that shares them). An OSError on the way (permission denied, no space
left, a path under a regular file, a read-only file system) becomes an `OutputError` naming the path.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finemoe.errors import OutputError
from finemoe.interrupts import deferred

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.EISDIR: "it is a folder",
}
_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)  # pyarrow's IOErrors carry it in the text


def output_error(path: str | os.PathLike, exc: OSError, *, folder: bool = False) -> OutputError:
    """One sentence naming `path` (a `folder` to be made, or a file) and why it cannot be written."""
    path = Path(path)
    blocker = _file_in_the_way(path, folder)
    if blocker == path:
        return OutputError(f"cannot write in {path}: it is a file, not a folder")
    if blocker is not None:
        return OutputError(f"cannot write {path}: {blocker} is a file, not a folder")
    code = exc.errno
    if code is None:
        found = _ERRNO_IN_TEXT.search(str(exc))
        code = int(found.group(1)) if found else None
    reason = _REASONS.get(code) or (exc.strerror or str(exc).splitlines()[0] or type(exc).__name__)
    return OutputError(f"cannot write {path}: {reason}")


def _file_in_the_way(path: Path, include_self: bool) -> Path | None:
    """The nearest existing ancestor of `path` (or `path`) when it is not a folder: nothing can go below it."""
    for parent in ([path] if include_self else []) + list(path.parents):
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


@contextmanager
def output_errors(path: str | os.PathLike, *, folder: bool = False) -> Iterator[None]:
    """Turn an OSError of the enclosed writes into an `OutputError` naming `path`."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise output_error(path, exc, folder=folder) from None


def ensure_dir(path: str | os.PathLike) -> Path:
    """`path` as a folder (made, with its parents, when missing)."""
    path = Path(path)
    with output_errors(path, folder=True):
        path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable(folder: str | os.PathLike) -> Path:
    """Fail now, not after minutes of work, when nothing can be written in `folder` (made if missing)."""
    folder = ensure_dir(folder)
    with output_errors(folder), deferred():
        _create_temp_file(folder / "write-check").unlink()
    return folder


def temp_name(path: Path, tag: str = "") -> Path:
    """`.<name>.<tag><random>.tmp` beside `path`: hidden, and found again by `stale_temporaries`."""
    return path.with_name(f".{path.name}.{tag}{secrets.token_hex(4)}.tmp")


def _create_temp_file(path: Path) -> Path:
    while True:
        tmp = temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # the umask applies
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def stale_temporaries(folder: Path, name: str) -> list[Path]:
    """Temporary files a killed writer left in `folder` for the output `name`."""
    return list(Path(folder).glob(f".{glob_escape(name)}.*.tmp"))


def glob_escape(name: str) -> str:
    """`name` as a glob pattern matching only itself."""
    return re.sub(r"([*?\[\]])", r"[\1]", name)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to (it exists, empty); renamed over `path` when the
    block ends, removed when it raises. Writers that take a file name (pyarrow, matplotlib) use this."""
    path = Path(path)
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = None
        try:
            with deferred():  # no interrupt between creating the temporary and knowing its name
                tmp = _create_temp_file(path)
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data, *, indent: int | None = 2, default=str) -> Path:
    """`data` as JSON text (with a final newline)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=default) + "\n")


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new folder `<prefix><random>` in `parent`, with the umask's permissions (mkdtemp gives 0700).
    A caller that removes it on an interrupt makes it under `deferred()`, so that it has the name
    (`atomic_dir`); collect's part folders are named by process instead, and a later run removes
    those of a process that is gone."""
    parent = ensure_dir(parent)
    with output_errors(parent / prefix):
        while True:
            tmp = parent / f"{prefix}{secrets.token_hex(4)}"
            try:
                os.mkdir(tmp, 0o777)
            except FileExistsError:
                continue
            return tmp


def replace_dir(tmp: Path, target: Path) -> Path:
    """Put the finished folder `tmp` in the place of `target` (a folder or nothing), so that a
    reader sees the old one or the new one; the old one is removed afterwards."""
    with output_errors(target):
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `target` to fill; it replaces `target` when the block ends and is
    removed when it raises."""
    target = Path(target)
    tmp = None
    try:
        with deferred():
            tmp = make_temp_dir(target.parent, f".{target.name}.")
        with output_errors(target):
            yield tmp
        with deferred():  # the old folder or the new one, never neither
            replace_dir(tmp, target)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def locked(lock_path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created when missing) for the block: writers of one
    shared file (e.g. a sweep's manifest) take turns. Advisory, fcntl.flock; a no-op off POSIX."""
    lock_path = Path(lock_path)
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent sweeps into one folder are not supported there
        yield
        return
    with output_errors(lock_path):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
