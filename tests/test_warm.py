"""sim/warm.py reaches every compiled path it is there to warm."""

from __future__ import annotations

from finemoe.sim.warm import RUNS, warm_kernels


def test_every_warm_up_run_takes_the_compiled_path():
    paths = warm_kernels()
    assert len(paths) == len(RUNS)
    assert set(paths.values()) == {"compiled"}, paths
