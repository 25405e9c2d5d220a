"""Interrupts held back where nothing could clean up after them (finemoe.interrupts), and pool
workers that stop inside a configuration, never half-way through sending a result."""

from __future__ import annotations

import os
import signal

import pytest

from finemoe import files
from finemoe.interrupts import Terminated, deferred, interrupts_raised, take_pending
from finemoe.sim.executors import local


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_is_raised_as_terminated_where_the_program_is():
    with pytest.raises(Terminated), interrupts_raised():
        _sigterm_self()
        for _ in range(10_000):  # the handler runs between bytecodes, soon after the signal
            pass


def test_an_interrupt_inside_a_deferred_block_is_raised_as_it_ends():
    reached_the_end = False
    with pytest.raises(Terminated), interrupts_raised():
        with deferred():
            _sigterm_self()
            for _ in range(10_000):
                pass
            reached_the_end = True
    assert reached_the_end


def test_only_the_outermost_deferred_block_raises_and_take_pending_clears():
    with interrupts_raised():
        with deferred():
            with deferred():
                _sigterm_self()
                for _ in range(10_000):
                    pass
            # the inner block ended without raising
            exc = take_pending()
        assert isinstance(exc, Terminated)
        assert take_pending() is None


@pytest.fixture
def sigint_as_python_sets_it():
    """SIGINT as a Python program started from a terminal has it (a pytest-xdist worker ignores it)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_is_deferred_too_and_the_handlers_are_restored(sigint_as_python_sets_it):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as caught, interrupts_raised():
        with deferred():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000):
                pass
    assert not isinstance(caught.value, Terminated)
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_ctrl_c_stays_ignored():
    """A shell script's background job starts with SIGINT ignored: the program must not take it back."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_raised():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000):
                pass
    finally:
        signal.signal(signal.SIGINT, before)


def test_an_interrupt_while_the_temporary_is_made_leaves_no_temporary(tmp_path, monkeypatch):
    made = files._create_temp_file

    def made_then_interrupted(path):
        tmp = made(path)
        _sigterm_self()  # arrives before the caller could know the temporary's name
        return tmp

    monkeypatch.setattr(files, "_create_temp_file", made_then_interrupted)
    with pytest.raises(Terminated), interrupts_raised():
        files.atomic_write_text(tmp_path / "out.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_a_stopped_worker_leaves_inside_a_configuration_and_waits_outside_one(monkeypatch):
    exits = []
    monkeypatch.setattr(local.os, "_exit", lambda code: exits.append(code))
    monkeypatch.setattr(local._ThisWorker, "in_task", False)
    monkeypatch.setattr(local._ThisWorker, "stopping", False)
    local._on_stop(local.STOP_SIGNAL, None)  # between configurations (perhaps sending a result)
    assert exits == [] and local._ThisWorker.stopping
    monkeypatch.setattr(local._ThisWorker, "stopping", False)
    monkeypatch.setattr(local._ThisWorker, "in_task", True)
    local._on_stop(local.STOP_SIGNAL, None)  # inside one: at once
    assert exits == [1]


def test_a_worker_told_to_stop_runs_no_further_configuration(monkeypatch):
    class Stop(Exception):
        pass

    def exit_(code):
        raise Stop

    ran = []
    monkeypatch.setattr(local.os, "_exit", exit_)
    monkeypatch.setattr(local, "execute", lambda work, config: ran.append(config))
    monkeypatch.setattr(local._ThisWorker, "stopping", True)
    with pytest.raises(Stop):
        local._task(None, "config")
    assert ran == []
