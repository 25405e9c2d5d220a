"""Per-layer capacities, expert precision and the SSD tier together, on the real Mixtral logs."""

from __future__ import annotations

import json

from click.testing import CliRunner

from finemoe.cli.main import cli


def _sweep(path, out, *args):
    res = CliRunner().invoke(cli, ["simulate", str(path), "--model-profile", "mixtral-8x7b", "--policy", "lfu",
                                   "--gpu-mem", "32G", "-o", str(out), "-q", "--json", *args],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_one_sweep_of_every_knob_on_mixtral(mixtral_trace_path, tmp_path):
    rows = _sweep(mixtral_trace_path, tmp_path / "knobs", "--expert-dtype", "bf16,int4",
                  "--layer-capacity", "shared,uniform,dp", "--host-mem", "32G,96G")
    got = {(r["expert_dtype"], r.get("memory.layer_capacity") or "shared", r["host_mem_bytes"] // 2**30): r
           for r in rows}
    assert len(got) == 12
    plain = {r.get("memory.layer_capacity") or "shared": r
             for r in _sweep(mixtral_trace_path, tmp_path / "plain", "--layer-capacity", "shared,uniform,dp")}
    for split in ("shared", "uniform", "dp"):
        bf16, int4 = got["bf16", split, 96], got["int4", split, 96]
        # 96 GiB hold all 90 GB of bf16 experts: the tier changes nothing.
        assert bf16["tpot_p50_s"] == plain[split]["tpot_p50_s"] and bf16["ssd_reads"] == 0
        assert int4["memory_plan.expert_cache_slots"] > bf16["memory_plan.expert_cache_slots"]
        assert int4["tpot_p50_s"] < bf16["tpot_p50_s"] / 10  # 221+ of 256 experts fit
        # 32 GiB hold 97 bf16 experts: the rest come from the SSD, and every load is a host hit or a read.
        small = got["bf16", split, 32]
        assert small["ssd_reads"] > 0 and small["tpot_p50_s"] > bf16["tpot_p50_s"]
        assert small["host_hits"] + small["ssd_reads"] == small["ondemand_loads"]
    for split in ("uniform", "dp"):  # a share per layer beats the shared pool with every expert in RAM
        assert got["bf16", split, 96]["tpot_p50_s"] < got["bf16", "shared", 96]["tpot_p50_s"]
        caps = json.loads(got["bf16", split, 96]["memory_plan.layer_capacity"])  # (lists travel as text)
        assert len(caps) == 32 and sum(caps) <= 86 and min(caps) >= 2
