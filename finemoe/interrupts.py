"""Ctrl-C and SIGTERM as exceptions, and the few stretches of code they must wait for.

SIGTERM is handled like Ctrl-C: raised as an exception where the program is, so every command's
interrupt path (keep what finished, remove what is half-written) runs for both. An exception that
may arrive between any two bytecodes may also arrive where nothing can clean up after it: between
creating a temporary file and the `try` that removes it, or inside concurrent.futures while the
main thread holds a future's lock (the pool's manager thread then waits for that lock forever: a
sweep that never exits after SIGTERM). Such code runs `deferred()`: an interrupt arriving within
it is raised when the block ends, or taken by `take_pending()` where the code can act on it.
Only the main thread runs signal handlers, so only its blocks defer.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a process manager, `kill`, a batch system's time limit)."""


def exit_code(exc: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def describe(exc: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"


class _State:
    depth = 0  # how many deferred() blocks the main thread is in
    pending: KeyboardInterrupt | None = None  # the first interrupt that arrived within them


def _on_signal(signum, frame) -> None:
    exc = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    if _State.depth:
        if _State.pending is None:
            _State.pending = exc
        return
    raise exc


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def interrupts_raised() -> Iterator[None]:
    """Within the block, SIGTERM and Ctrl-C raise `Terminated` and `KeyboardInterrupt` in the main
    thread, held back inside `deferred()` blocks. (Ctrl-C is left alone where it was ignored, as in a
    shell script's background job; off the main thread the block changes nothing.)"""
    if not _in_main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_signal)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _State.pending = None


def take_pending() -> KeyboardInterrupt | None:
    """The interrupt that arrived within the current deferred() blocks, if any (now no longer pending)."""
    exc, _State.pending = _State.pending, None
    return exc


@contextmanager
def deferred() -> Iterator[None]:
    """Run the block whole: an interrupt arriving within it is raised as it ends (by the outermost
    block, in place of any exception the block raised)."""
    if not _in_main_thread():
        yield
        return
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        if _State.depth == 0 and _State.pending is not None:
            raise take_pending()
