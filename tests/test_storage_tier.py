"""--host-mem / --storage: host memory as an LRU in front of an SSD, hand-computed, in the engine
and from the command line."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.errors import ConfigError
from finemoe.sim.config import MemoryConfig, SimConfig
from finemoe.sim.costs import to_ticks
from finemoe.sim.hardware import PRESETS
from finemoe.sim.metrics import MetricsRecorder
from finemoe.sim.offline import loads
from finemoe.sim.run import simulate
from finemoe.sim.storage import STORAGE_PRESETS, HostTier, StorageSpec
from finemoe.traces.io import write_trace
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

SSD = StorageSpec("test-ssd", read_gbps=1.0, latency_s=1e-4, efficiency=1.0)  # 1 GB/s, 100 us


def test_host_memory_is_an_lru_in_front_of_the_ssd():
    rec = MetricsRecorder(num_layers=1)
    tier = HostTier(2, SSD, 10**6, num_layers=1, num_experts=4, recorder=rec)  # 1 MB experts: 1 ms a read
    assert list(tier.lru) == [(0, 0), (0, 1)]  # the first experts in (layer, expert) order
    assert tier.ready_at((0, 0), 5) == 5  # in host RAM: at once
    read = to_ticks(1e-3)
    assert tier.ready_at((0, 2), 0) == to_ticks(1e-4) + read  # latency, then the bytes
    # (0, 1) was least recently used: evicted; a second read waits for the first's bandwidth.
    assert list(tier.lru) == [(0, 0), (0, 2)]
    assert tier.ready_at((0, 3), 0) == to_ticks(1e-4) + 2 * read
    assert (rec.host_hits, rec.ssd_reads, rec.bytes_ssd) == (1, 2, 2 * 10**6)
    with pytest.raises(ConfigError, match="holds no expert"):
        HostTier(0, SSD, 10**6, 1, 4, rec)


def _run(trace, host_mem=None, policy="lru", slots=6):
    cfg = SimConfig("t", policy, PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=slots),
                    host_mem_bytes=host_mem, storage=None if host_mem is None else SSD, timeline_steps=0)
    return simulate(trace, cfg)


def test_enough_host_memory_is_no_tier_and_too_little_reads_the_ssd():
    trace = synthetic_trace(tiny_geometry(num_layers=2, num_experts=6, top_k=2), num_requests=4, seed=3)
    g = trace.geometry
    plain = _run(trace).summary
    every = _run(trace, host_mem=g.total_expert_bytes).summary
    for key in ("tpot_p50_s", "ttft_p50_s", "makespan_s", "stall_s", "ondemand_loads", "hits"):
        assert every[key] == plain[key], key
    assert every["ssd_reads"] == 0 and every["host_hits"] == plain["ondemand_loads"]
    small = _run(trace, host_mem=3 * g.bytes_per_expert)
    s = small.summary
    assert s["hits"] == plain["hits"]  # the GPU cache decides the same; only the copies wait longer
    assert s["ssd_reads"] > 0 and s["bytes_ssd"] == s["ssd_reads"] * g.bytes_per_expert
    assert s["host_hits"] + s["ssd_reads"] == s["ondemand_loads"] + s.get("prefetch_started", 0)
    assert s["makespan_s"] > plain["makespan_s"] and s["stall_s"] > plain["stall_s"]
    assert loads(small) >= s["bound_loads"] and s["tpot_mean_s"] >= s["bound_tpot_mean_s"]  # bounds still hold
    assert small.config["host_expert_slots"] == 3 and small.config["storage"]["name"] == "test-ssd"
    assert "host_mem_bytes" not in _run(trace).config  # unset: keys as before


def test_presets_cite_their_drives():
    assert set(STORAGE_PRESETS) == {"pcie4-ssd", "pcie5-ssd"}
    assert all("MB/s" in s.source for s in STORAGE_PRESETS.values())


def test_cli_host_memory_sweep_and_its_errors(tmp_path):
    path = tmp_path / "syn.parquet"
    trace = synthetic_trace(num_requests=4, generated_tokens=6, seed=2)
    write_trace(trace, path)
    per = trace.geometry.bytes_per_expert

    def run(*args):
        return CliRunner().invoke(cli, ["simulate", str(path), "-q", "-o", str(tmp_path / "r"), *args])

    ok = run("--policy", "lru", "--expert-cache", "6", "--host-mem", f"{4 * per}B,{1000 * per}B",
             "--storage", "pcie5-ssd")
    assert ok.exit_code == 0, ok.output
    header, *rows = [line for line in ok.output.splitlines() if line.startswith(("policy", "lru"))]
    assert "host mem" in header and "SSD GB" in header and len(rows) == 2
    for args, words in ((["--storage", "pcie5-ssd"], "give --host-mem too"),
                        (["--host-mem", "1K"], "holds no expert"),
                        (["--host-mem", "1G", "--storage", "floppy"], "unknown storage 'floppy'"),
                        (["--host-mem", "1G", "--policy", "cpu-all"], "does not model yet")):
        bad = run(*args)
        assert bad.exit_code == 1 and words in bad.output and "Traceback" not in bad.output, (args, bad.output)


def test_a_measured_read_path_becomes_a_storage_profile(tmp_path):
    import json

    from finemoe.replay.calibrate_storage import fit_storage, measure_storage
    from finemoe.sim.storage import load_storage

    m = measure_storage(tmp_path, 64 * 1024, 8)
    assert m["cold_gbps"] > 0 and m["cached_gbps"] > 0 and m["latency_s"] > 0 and len(m["cold_chunk_s"]) == 8
    assert list(tmp_path.iterdir()) == []  # the test file is gone
    spec = fit_storage(m, "here")
    assert spec.read_gbps == m["cold_gbps"] and spec.efficiency == 1.0
    profile = tmp_path / "me.json"
    profile.write_text(json.dumps({"hardware": {}, "storage": spec.to_dict()}))
    assert load_storage(str(profile)) == spec
    profile.write_text(json.dumps({"hardware": {}}))
    with pytest.raises(ConfigError, match='not a profile with a "storage" object'):
        load_storage(str(profile))
    with pytest.raises(ConfigError, match="no such folder"):
        measure_storage(tmp_path / "nope", 4096, 2)
    bad = CliRunner().invoke(cli, ["calibrate", "-o", str(tmp_path / "p.json"), "--storage-dir", str(tmp_path / "nope")])
    assert bad.exit_code == 1 and "no such folder" in bad.output and "Traceback" not in bad.output


def test_queue_depth_one_pays_each_reads_latency_after_the_last():
    serial = StorageSpec("qd1", read_gbps=1.0, latency_s=1e-4, efficiency=1.0, queue_depth=1)
    tier = HostTier(1, serial, 10**6, num_layers=1, num_experts=4, recorder=MetricsRecorder(num_layers=1))
    read, lat = to_ticks(1e-3), to_ticks(1e-4)
    assert tier.ready_at((0, 1), 0) == lat + read
    assert tier.ready_at((0, 2), 0) == 2 * (lat + read)  # against lat + 2 x read at a deeper queue
    with pytest.raises(ConfigError, match="queue_depth >= 1"):
        StorageSpec("bad", 1.0, 1e-4, queue_depth=0)
