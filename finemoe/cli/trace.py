"""`finemoe trace ...`: inspect traces."""

from __future__ import annotations

import click


@click.group("trace")
def trace_group() -> None:
    """Inspect and check traces (Parquet files or directories of part files)."""


def _size_on_disk(path) -> tuple[int, int]:
    from finemoe.traces.io import trace_files

    files = trace_files(path)
    return len(files), sum(f.stat().st_size for f in files)


def _extreme(fn, values) -> float:
    """nanmin/nanmax that says NaN instead of warning when nothing was measured."""
    import numpy as np

    return float(fn(values)) if np.isfinite(values).any() else float("nan")


@trace_group.command("info")
@click.argument("trace_path", metavar="TRACE", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--decode-only", is_flag=True, help="Routing statistics over decode iterations only (no prefill).")
@click.option("--per-layer", is_flag=True, help="Also print the statistics of every layer.")
def info_command(trace_path, as_json, decode_only, per_layer) -> None:
    """Summarise a trace: requests, tokens, geometry, size, gaps and routing statistics.

    \b
    Routing statistics (bits; records missing from the source are left out):
      usage entropy   per layer, of how often each expert is selected (every top-k
                      slot counts once); log2(experts) = perfectly balanced
      fine            per-iteration entropy: for each (iteration, layer), entropy of the
                      mean routing distribution of that iteration's tokens (one token per
                      decode step), averaged; what a per-iteration prefetcher faces
      coarse          per-request entropy: the same mean taken over all tokens of a
                      request, averaged over (request, layer); what request-level
                      statistics (activation matrices) see
      next layer      H(top-1 at l+1 | top-1 at l) next to H(top-1 at l+1): how much
                      this layer's choice tells about the next one's
    A token's routing distribution is its full router softmax when the trace has
    router_probs, else its top-k gate weights renormalised (zero elsewhere), which
    reads lower because the tail is dropped. See docs/trace-format.md.

    \b
    Examples:
      finemoe trace info trace.parquet
      finemoe trace info trace.parquet --decode-only --per-layer
      finemoe trace info parts-dir/ --json > info.json
    """
    import json

    import numpy as np

    from finemoe.traces.io import read_trace
    from finemoe.traces.stats import _mean, routing_stats, summarize

    trace = read_trace(trace_path)
    n_files, size = _size_on_disk(trace_path)
    summary = summarize(trace)
    stats = routing_stats(trace, decode_only=decode_only)
    if as_json:
        out = {"path": str(trace_path), "files": n_files, "size_bytes": size,
               "bytes_per_token_row": round(size / max(trace.num_tokens, 1), 1),
               **summary, "routing": {**stats.to_dict(), "decode_only": decode_only},
               "metadata": trace.metadata}
        click.echo(json.dumps(out, indent=2, default=str))
        return
    g = trace.geometry
    s = summary
    gen = s["generated_tokens_per_request"]
    gen_text = "/".join(map(str, gen[:12])) + ("/..." if len(gen) > 12 else "")
    prompt = f"{s['prompt_tokens']:,}"
    if s["prompt_tokens_unknown_requests"]:
        prompt += f" (unknown for {s['prompt_tokens_unknown_requests']} request(s), counted as 0)"
    lines = [
        f"trace        {trace_path}: {n_files} file(s), {size / 1e6:.2f} MB on disk, "
        f"{size / max(trace.num_tokens, 1):,.0f} bytes per token row",
        f"model        {g.model_name}: {g.num_layers} MoE layers x {g.num_experts} experts, top-{g.top_k}, "
        f"{g.num_shared_experts} shared; {g.bytes_per_expert:,} bytes per expert ({g.dtype})",
        f"requests     {s['requests']} ({s['requests_with_prefill']} with prefill recorded)",
        f"tokens       prompt {prompt}; generated {s['generated_tokens']:,} ({gen_text}); "
        f"{s['token_rows']:,} token rows in {s['iterations']:,} iterations",
        *([] if not trace.is_partial else [
            f"layers       {len(s['layers_logged'])} of {g.num_layers} logged "
            f"({', '.join(map(str, s['layers_logged'][:12]))}{', ...' if len(s['layers_logged']) > 12 else ''}); "
            "the others are not in the log"]),
        f"gaps         {s['missing_records']:,} (token, layer) records missing{' in the logged layers' if trace.is_partial else ''}, "
        f"in {s['tokens_with_missing_layers']:,} token(s) ({s['tokens_missing_every_layer']} missing every "
        f"{'logged ' if trace.is_partial else ''}layer)",
        f"fields       experts, weights{''.join(', ' + f for f in s['optional_fields'])}",
        f"source       {s['source'] or 'not recorded'}",
        "",
        f"routing over {stats.tokens_used:,} {'decode ' if decode_only else ''}tokens, distributions from {stats.source}:",
        f"  usage entropy per layer  mean {_mean(stats.usage_entropy_bits):.3f} bits, min "
        f"{_extreme(np.nanmin, stats.usage_entropy_bits):.3f}, max {_extreme(np.nanmax, stats.usage_entropy_bits):.3f} "
        f"(balanced: {stats.max_entropy_bits:.3f})",
        f"  fine (per iteration)     {stats.fine_entropy_bits:.3f} bits",
        f"  coarse (per request)     {stats.coarse_entropy_bits:.3f} bits",
        f"  next layer's top-1       {_mean(stats.next_top1_entropy_bits):.3f} bits; "
        f"given this layer's top-1 {_mean(stats.next_top1_cond_entropy_bits):.3f} bits",
        f"  top-1 share of top-k weight  {stats.top1_weight_share:.3f}",
    ]
    if per_layer:
        lines.append("  layer  usage  fine  coarse  H(next top-1 | top-1)")
        for layer in range(g.num_layers):
            cond = stats.next_top1_cond_entropy_bits
            c = f"{cond[layer]:.3f}" if layer < cond.size else "-"
            lines.append(
                f"  {layer:5d}  {stats.usage_entropy_bits[layer]:.3f}  {stats.fine_entropy_per_layer_bits[layer]:.3f}"
                f"  {stats.coarse_entropy_per_layer_bits[layer]:.3f}  {c}"
            )
    click.echo("\n".join(lines))


@trace_group.command("validate")
@click.argument("trace_path", metavar="TRACE", type=click.Path())
def validate_command(trace_path) -> None:
    """Read a trace with every check on; exit 0 if valid, 1 with the first problem if not.

    Checks: a regular file (not a pipe or device), readable Parquet, schema version,
    required columns and their types, geometry (expert ids below the expert count,
    top-k width, layer count), at least one token row, rows sorted and unique per
    (request, iteration, position), the requests table (every request listed has
    rows), gate weights, router_probs and speculative weights finite and non-negative
    (router_probs at most 1), semantic keys finite, and the declared number of missing
    records.

    \b
    Examples:
      finemoe trace validate trace.parquet
      finemoe trace validate parts-dir/ && finemoe simulate parts-dir/ --gpu-mem 24G
    """
    from finemoe.traces.io import read_trace

    trace = read_trace(trace_path)
    click.echo(
        f"ok: {trace_path} is a valid trace ({len(trace.requests)} requests, {trace.num_tokens:,} token rows, "
        f"{trace.num_missing:,} missing records declared)"
    )


COMMANDS = [trace_group]
