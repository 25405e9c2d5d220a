"""--expert-dtype: experts re-sized to a storage format, block scales counted, lossy said everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.errors import ConfigError
from finemoe.sim.config import MemoryConfig, SimConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.memory import plan_memory
from finemoe.sim.run import simulate
from finemoe.traces.io import write_trace
from finemoe.traces.precision import EXPERT_FORMATS, expert_format, with_expert_format
from finemoe.traces.profiles import get_profile
from finemoe.traces.synthetic import synthetic_trace

MIXTRAL_EXPERT_WEIGHTS = 3 * 4096 * 14336  # gate, up, down of one Mixtral-8x7B expert


def test_mixtral_expert_bytes_per_format():
    g = get_profile("mixtral-8x7b").geometry()
    assert g.bytes_per_expert == 2 * MIXTRAL_EXPERT_WEIGHTS
    # Q4_0: 18 bytes per block of 32 weights; Q8_0: 34; MXFP4: 17 (16 bytes of FP4 + an 8-bit scale).
    assert with_expert_format(g, "int4").bytes_per_expert == MIXTRAL_EXPERT_WEIGHTS // 32 * 18 == 99_090_432
    assert with_expert_format(g, "int8").bytes_per_expert == MIXTRAL_EXPERT_WEIGHTS // 32 * 34
    assert with_expert_format(g, "mxfp4").bytes_per_expert == MIXTRAL_EXPERT_WEIGHTS // 32 * 17
    assert with_expert_format(g, "q4_k").bytes_per_expert == MIXTRAL_EXPERT_WEIGHTS // 256 * 144
    assert with_expert_format(g, "bf16") == g
    same = with_expert_format(g, "fp8")  # everything but the experts stays as traced
    assert (same.dense_bytes, same.kv_bytes_per_token, same.dtype) == (g.dense_bytes, g.kv_bytes_per_token, g.dtype)


def test_formats_below_16_bits_are_lossy_and_unknown_ones_one_sentence():
    assert [f.name for f in EXPERT_FORMATS.values() if not f.lossy] == ["bf16", "fp16"]
    assert expert_format("INT4").label == "int4 experts (lossy)"
    with pytest.raises(ConfigError, match="unknown expert dtype 'int3'; known: bf16"):
        expert_format("int3")


def test_a_budget_holds_more_int4_experts():
    g = get_profile("mixtral-8x7b").geometry()
    slots = {name: plan_memory(with_expert_format(g, name), PRESETS["rtx3090"], MemoryConfig(gpu_mem_bytes=24 * 2**30),
                               max_batch=1, longest_request_tokens=512).expert_cache_slots
             for name in ("bf16", "int8", "int4")}
    free = 24 * 2**30 - g.dense_bytes - 512 * g.kv_bytes_per_token - 512 * 2**20
    assert slots["bf16"] == free // g.bytes_per_expert
    assert slots["int4"] == min(256, free // 99_090_432) > slots["int8"] > slots["bf16"]


def test_simulation_moves_and_charges_the_formats_bytes():
    trace = synthetic_trace(num_requests=4, generated_tokens=6, seed=1)
    g = trace.geometry
    runs = {}
    for name in (None, "int4"):
        cfg = SimConfig("t", "lru", PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=6), expert_dtype=name)
        runs[name] = simulate(trace, cfg)
    base, q = runs[None].summary, runs["int4"].summary
    int4_bytes = with_expert_format(g, "int4").bytes_per_expert
    assert q["misses"] == base["misses"]  # the same slots: the same decisions
    assert base["bytes_h2d"] == base["ondemand_loads"] * g.bytes_per_expert
    assert q["bytes_h2d"] == q["ondemand_loads"] * int4_bytes
    assert q["stall_s"] < base["stall_s"] and q["tpot_p50_s"] < base["tpot_p50_s"]
    assert runs["int4"].config["expert_dtype"] == "int4"
    assert runs["int4"].config["geometry"]["bytes_per_expert"] == int4_bytes
    # Unset, the configuration (and its result file's key) is what it was before the option existed.
    assert "expert_dtype" not in runs[None].config


def test_cli_sweeps_expert_dtypes_and_labels_the_lossy_ones(tmp_path):
    path = tmp_path / "syn.parquet"
    write_trace(synthetic_trace(num_requests=4, generated_tokens=6, seed=2), path)
    run = CliRunner().invoke(cli, ["simulate", str(path), "--policy", "lru", "--expert-cache", "6",
                                   "--expert-dtype", "bf16,int4", "-o", str(tmp_path / "r"), "-q"],
                             catch_exceptions=False)
    assert run.exit_code == 0, run.output
    rows = [line for line in run.output.splitlines() if line.startswith("lru")]
    assert len(rows) == 2 and "int4 (lossy)" in rows[1] and "lossy" not in rows[0]
    bad = CliRunner().invoke(cli, ["simulate", str(path), "--expert-dtype", "int3", "-o", str(tmp_path / "b")])
    assert bad.exit_code == 1 and "unknown expert dtype 'int3'" in bad.output and "Traceback" not in bad.output


def test_figure_labels_say_lossy(tmp_path):
    from finemoe.plots.data import load_runs, series_label

    path = tmp_path / "syn.parquet"
    write_trace(synthetic_trace(num_requests=4, generated_tokens=6, seed=2), path)
    CliRunner().invoke(cli, ["simulate", str(path), "--policy", "lru", "--expert-cache", "6", "--expert-dtype",
                             "int4", "-o", str(tmp_path / "r"), "-q"], catch_exceptions=False)
    (run,) = load_runs([Path(tmp_path / "r")])
    assert series_label(run, {}) == "lru, int4 experts (lossy)"
