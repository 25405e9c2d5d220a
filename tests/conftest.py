"""Shared fixtures: the ../shared data (skipped with a reason when absent) and synthetic traces."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# A bug re-raised, not turned into an `error:` line: tests of faults must not pass on a bug.
os.environ.setdefault("FINEMOE_DEBUG", "1")

# Property tests draw the same examples on every run of the same code (and write no example
# database), so a CI run cannot fail on the day a random draw meets an open counterexample;
# FINEMOE_EXPLORE=1 draws new ones (counterexamples it finds go into the tests as named cases).
# Hypothesis also draws, now and then, constants from the source of the project's modules a
# process has imported, so a change of code can change the draws (docs/bounds.md).
from hypothesis import settings  # noqa: E402

settings.register_profile("finemoe-fixed", derandomize=True, database=None)
settings.register_profile("finemoe-explore")
settings.load_profile("finemoe-explore" if os.environ.get("FINEMOE_EXPLORE") == "1" else "finemoe-fixed")


def pytest_configure(config):
    """The controller (or a run without workers) first compiles every kernel, or reads it from
    numba's cache (sim/warm.py), so that the workers, the Ray workers and the sweeps' pools the
    tests start read that cache instead of each compiling the same kernels at once (a fresh
    clone's suite beside two busy loops spent minutes doing so)."""
    if hasattr(config, "workerinput"):
        return
    from finemoe.sim.warm import warm_kernels

    warm_kernels()


REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FINEMOE_SHARED", REPO_ROOT.parent / "shared"))
MIXTRAL_LOGS = SHARED / "traces" / "mixtral-8x7b-instruct"
LMSYS_PROMPTS = SHARED / "prompts" / "lmsys-chat-1m-64.json"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared is absent ({SHARED}); real-data tests need it")
    return SHARED


@pytest.fixture(scope="session")
def mixtral_logs(shared_dir) -> Path:
    if not MIXTRAL_LOGS.is_dir():
        pytest.skip(f"real Mixtral routing logs not found at {MIXTRAL_LOGS}")
    return MIXTRAL_LOGS


@pytest.fixture(scope="session")
def mixtral_trace_path(mixtral_logs, tmp_path_factory) -> Path:
    """The gsm8k_2 and humaneval_2 logs imported once through `finemoe import` (4 decode-only requests)."""
    from click.testing import CliRunner

    from finemoe.cli.main import cli

    out = tmp_path_factory.mktemp("mixtral") / "mixtral.parquet"
    res = CliRunner().invoke(cli, ["import", str(mixtral_logs / "gsm8k_2_routing.jsonl"),
                                   str(mixtral_logs / "humaneval_2_routing.jsonl"),
                                   "--model-profile", "mixtral-8x7b", "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="session")
def lmsys_prompts(shared_dir) -> Path:
    if not LMSYS_PROMPTS.is_file():
        pytest.skip(f"LMSYS prompts not found at {LMSYS_PROMPTS}")
    return LMSYS_PROMPTS


@pytest.fixture
def small_trace():
    from finemoe.traces.synthetic import synthetic_trace

    return synthetic_trace(seed=0)
