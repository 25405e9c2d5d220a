"""`finemoe calibrate`: measure this machine and write a hardware profile that simulate accepts."""

from __future__ import annotations

import click

from finemoe.cli.options import output_option, quiet_option


@click.command("calibrate")
@click.option("--device", default="cpu", show_default=True,
              help="cuda (a GPU, pinned host memory, copy streams) or cpu (device memory is another host buffer).")
@output_option("output", required=True,
               help="Profile JSON to write; pass it to `finemoe simulate --hardware` or `replay --hardware`.")
@click.option("--quick/--thorough", default=True, show_default=True,
              help="Quick takes seconds; thorough measures more sizes and repeats (tens of seconds).")
@click.option("--dtype", default="bfloat16", show_default=True, help="GEMM dtype: bfloat16, float16 or float32.")
@click.option("--threads", type=int, default=None,
              help="torch CPU threads [default: cores - 1 on cpu]; use the same for replay.")
@click.option("--hidden-size", type=int, default=1024, show_default=True, help="Expert GEMM shape to measure.")
@click.option("--intermediate-size", type=int, default=2048, show_default=True, help="Expert GEMM shape to measure.")
@click.option("--storage-dir", type=click.Path(file_okay=False), default=None,
              help="Also measure reading experts from a file in this folder (on the SSD to model): "
                   "writes a test file there (256 MB quick, 1 GB thorough) and removes it.")
@quiet_option("No \"measuring ...\" progress lines on stderr.")
def calibrate_cmd(device: str, output: str, quick: bool, dtype: str, threads: int | None, hidden_size: int,
                  intermediate_size: int, storage_dir: str | None, quiet: bool) -> None:
    """Measure copy bandwidth/latency, copy overlap, expert GEMMs and memory bandwidth.

    \b
    The profile holds the fitted HardwareSpec ("hardware") and the raw tables ("measurements"):
      finemoe calibrate --device cpu -o cpu.json
      finemoe simulate TRACE --hardware cpu.json --policy lru --gpu-mem 2G
    It also holds the host CPU as `--cpu` reads it ("cpu": experts timed on the replayer's own
    CPU thread), for the policies that compute experts there:
      finemoe simulate TRACE --cpu cpu.json --policy static,cpu-all,fiddler
    With --storage-dir, a file read path as `--storage` reads it ("storage"):
      finemoe calibrate -o me.json --storage-dir /mnt/nvme
      finemoe simulate TRACE --host-mem 32G --storage me.json
    """
    from pathlib import Path

    from finemoe.errors import ConfigError
    from finemoe.files import check_writable
    from finemoe.replay.calibrate import calibrate, write_profile
    from finemoe.replay.compute import ExpertShape

    if hidden_size <= 0 or intermediate_size <= 0:
        raise ConfigError("--hidden-size and --intermediate-size must be positive")
    check_writable(Path(output).parent)  # before the measurements, not after them
    if storage_dir is not None:
        if not Path(storage_dir).is_dir():
            raise ConfigError(f"--storage-dir {storage_dir}: no such folder")
        check_writable(Path(storage_dir))
    profile = calibrate(device, dtype=dtype, thorough=not quick, shape=ExpertShape(hidden_size, intermediate_size), threads=threads,
                        progress=None if quiet else lambda msg: click.echo(f"measuring {msg} ...", err=True))
    if storage_dir is not None:
        from finemoe.replay.calibrate_storage import fit_storage, measure_storage

        if not quiet:
            click.echo(f"measuring reads from a file in {storage_dir} ...", err=True)
        chunk = 3 * hidden_size * intermediate_size * 2  # one bf16 expert of the measured shape
        total = (256 if quick else 1024) * 2**20
        measured = measure_storage(storage_dir, chunk, max(8, total // chunk))
        profile["storage"] = fit_storage(measured, f"read path of {Path(storage_dir).resolve()}").to_dict()
        profile["measurements"]["storage"] = measured
        if measured["page_cache_suspected"]:
            profile.setdefault("warnings", []).append(
                f"reads from {storage_dir} ran at {measured['cold_gbps']:.1f} GB/s against {measured['cached_gbps']:.1f} "
                "cached: the page cache (or a RAM-backed folder) may have served them")
    write_profile(profile, output)
    click.echo(format_profile(profile))
    click.echo(f"wrote {output}")
    if profile.get("warnings"):
        click.echo(f"warning: {'; '.join(profile['warnings'])}; check it before trusting simulations on "
                   "this profile (\"warnings\" in the profile JSON)", err=True)


def format_profile(profile: dict) -> str:
    """A short human summary of a profile: the fitted numbers and the fit's worst residual."""
    hw, m = profile["hardware"], profile["measurements"]
    copies = m["copy"].get("pinned") or m["copy"]["pageable"]
    peak = max(r["gbps"] for r in copies)
    lines = [
        f"device            {m['device_name']} ({m['device']}, {m['dtype']}, {m['cpu_threads']} threads, {m['plan']}, {m['duration_s']:.1f} s)",
        f"host->device      {hw['pcie_gbps']:.2f} GB/s fitted ({m['link_fit_from']}), best single copy {peak:.2f} GB/s, "
        f"latency {hw['transfer_latency_s'] * 1e6:.1f} us, copy engines {hw['copy_engines']}",
    ]
    if "pinned" in m["copy"]:
        pageable = max(r["gbps"] for r in m["copy"]["pageable"])
        lines.append(f"pageable copies   best {pageable:.2f} GB/s")
    lines += [
        f"memory            {hw['hbm_gbps']:.1f} GB/s peak stream, expert GEMV reaches {hw['memory_efficiency']:.0%}",
        f"compute           {hw['flops'] / 1e12:.3f} TFLOP/s best GEMM, expert GEMMs reach {hw['compute_efficiency']:.0%}",
        f"fixed cost        {hw['kernel_launch_s'] * 1e6:.1f} us per expert call",
    ]
    if "cpu" in profile:
        cpu = profile["cpu"]
        lines.append(f"host CPU thread   experts from host memory at {cpu['mem_gbps'] * cpu['memory_efficiency']:.1f} GB/s, "
                     f"{cpu['expert_overhead_s'] * 1e6:.1f} us per expert, {cpu['sync_s'] * 1e6:.1f} us per layer's "
                     "hand-off (`--cpu PROFILE.json`)")
    if "storage" in profile:
        st = profile["storage"]
        lines.append(f"file reads        {st['read_gbps']:.2f} GB/s, {st['latency_s'] * 1e6:.0f} us per small read "
                     "(`--storage PROFILE.json`)")
    if "replayer_dispatch" in m:
        lines.append(f"replayer's own    {hw['layer_overhead_s'] * 1e6:.1f} us per layer, "
                     f"{hw['expert_overhead_s'] * 1e6:.1f} us per expert, {hw['miss_overhead_s'] * 1e6:.1f} us per miss")
    if "copy_interference" in m:
        lines.append(f"copies vs compute compute x{hw['copy_compute_slowdown']:.2f} slower during copies, copies "
                     f"x{hw['compute_copy_slowdown']:.2f} during compute, +{hw['copy_start_delay_s'] * 1e6:.0f} us "
                     "to start one")
    worst = max(m["fit"]["residuals"], key=lambda r: abs(r["rel_error"]))
    what = f"{worst['tokens']} tokens" if "tokens" in worst else f"{worst['copy_bytes']} byte copy"
    lines.append(f"fit               worst residual {worst['rel_error']:+.0%} ({what})")
    return "\n".join(lines)


COMMANDS = [calibrate_cmd]
