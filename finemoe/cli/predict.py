"""`finemoe predict`: how well each policy predicts the experts a trace routes to, without timing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from finemoe.cli.options import json_option, output_option, quiet_option, seed_option
from finemoe.cli.partial import layers_as_consecutive_option
from finemoe.cli.policy_file import policy_file_option

EPILOG = """\b
Examples:
  # every predictive policy the trace supports, 70/30 history/measure split by request
  finemoe predict trace.parquet
\b
  # FineMoE against its ablations, prefetch distance 2, as JSON
  finemoe predict trace.parquet --policy finemoe,finemoe-semantic,finemoe-trajectory \\
      --policy-param finemoe.distance=2 --json
\b
  # per-layer precision and recall of two policies, written as Parquet (one row per policy x layer)
  finemoe predict trace.parquet --policy moe-infinity,promoe --per-layer -o predict.parquet
\b
What counts: a policy's prefetches for (step, layer) issued before that layer's gate ran are its
prediction; the experts routed there are the truth. precision = correct / predicted, recall =
correct / routed, summed over the measured steps. No cache, no clock: this scores the predictor
alone; `finemoe simulate` scores it together with scheduling and eviction.
"""


@click.command("predict", epilog=EPILOG)
@click.argument("trace_path", metavar="TRACE", type=click.Path())
@click.option("--policy", "policies", default="all", show_default=True, metavar="LIST",
              help="Comma-separated policy names; 'all' = every non-oracle policy this trace has the fields for.")
@policy_file_option
@click.option("--policy-param", "policy_params", multiple=True, metavar="POLICY.NAME=VALUE",
              help="A policy parameter, e.g. finemoe.distance=2 (one value). Repeatable.")
@click.option("--history-fraction", type=float, default=0.7, show_default=True,
              help="Share of requests (seeded, by request) that build maps/histories/predictors.")
@click.option("--online", is_flag=True, help="No history: measure every request, policies learn as requests finish.")
@seed_option("Seed of the history/measure split.")
@click.option("--max-requests", type=int, default=None, help="Measure at most this many requests (quick runs).")
@click.option("--per-layer", is_flag=True, help="Print the per-layer table too.")
@layers_as_consecutive_option
@json_option("Print the reports as JSON instead of tables.")
@output_option("out", kind="any",
               help="Write the per-layer table: .parquet (reports in the file metadata) or .json.")
@quiet_option()
def predict_command(trace_path, policies, policy_params, history_fraction, online, seed, max_requests,
                    per_layer, as_json, out, layers_as_consecutive, quiet) -> None:
    """Score each policy's expert predictions against a trace: per-layer precision and recall.

    Uses the same history/measure split as `finemoe simulate` for the same seed and fraction.
    """
    from tqdm import tqdm

    from finemoe.errors import ConfigError
    from finemoe.files import check_writable
    from finemoe.policies.registry import make_policy, policy_names
    from finemoe.policies.support import TraceShape, missing_fields, unsupported_reason
    from finemoe.sim.predict import evaluate_predictions
    from finemoe.sim.sweep import check_split, parse_policy_params
    from finemoe.traces.io import read_trace

    check_split(history_fraction, max_requests)
    if out:
        _check_suffix(Path(out))
        check_writable(Path(out).parent)
    trace = read_trace(trace_path)
    if layers_as_consecutive:
        trace = trace.logged_layers_only()
    params = {}
    for name, values in parse_policy_params(policy_params).items():
        for key, vals in values.items():
            if len(vals) != 1:
                raise ConfigError(f"--policy-param {name}.{key}: predict takes one value, got {len(vals)}")
            params.setdefault(name, {})[key] = vals[0]
    known = policy_names()
    if policies.strip() == "all":
        names, shape = [], TraceShape.of_trace(trace)
        for name in known:
            policy = make_policy(name, **params.get(name, {}))
            if policy.is_oracle:
                continue
            lacking = missing_fields(policy, shape)
            reason = f"trace lacks {', '.join(lacking)}" if lacking else unsupported_reason(policy, shape)
            if reason:
                click.echo(f"skipping {name}: {reason}", err=True)
            else:
                names.append(name)
    else:
        names = [n.strip() for n in policies.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"unknown policy {unknown[0]!r}; known policies: {', '.join(known)}")
    for name in params:
        if name not in names:
            raise ConfigError(f"--policy-param names policy {name!r}, which is not among those scored")
    if not names:
        raise ConfigError("no policy to score")

    reports = []
    for name in tqdm(names, desc="policies", unit="policy", disable=quiet or as_json or len(names) < 2, leave=False):
        reports.append(
            evaluate_predictions(
                trace, name, params.get(name), history_fraction=history_fraction, online=online,
                seed=seed, max_requests=max_requests,
            )
        )
    if out:
        _write(reports, Path(out))
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2, default=_json_default))
        return
    click.echo(_totals_table(reports))
    if per_layer:
        for r in reports:
            click.echo(f"\n{r.policy}")
            click.echo(r.per_layer.drop(columns=["policy"]).to_string(index=False, float_format="%.3f"))
    if out:
        click.echo(f"wrote {out}")


def _totals_table(reports) -> str:
    head = f"{'policy':<22} {'precision':>9} {'recall':>7} {'pred/layer':>10} {'fit_s':>8} {'steps':>6}"
    lines = [head, "-" * len(head)]
    for r in reports:
        t = r.totals
        lines.append(
            f"{r.policy:<22} {_f(t['precision']):>9} {_f(t['recall']):>7} "
            f"{t['predicted_per_layer_step']:>10.2f} {t['fit_s']:>8.3f} {t['steps']:>6}"
        )
    return "\n".join(lines)


def _f(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _check_suffix(path: Path) -> None:
    from finemoe.errors import ConfigError

    if path.suffix not in (".parquet", ".json"):
        raise ConfigError(f"--output {path}: use a .parquet or .json file name")


def _write(reports, path: Path) -> None:
    """One table of every policy's per-layer rows; atomic (temporary file, then rename)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from finemoe.files import atomic_path, atomic_write_json

    _check_suffix(path)
    if path.suffix == ".json":
        atomic_write_json(path, [r.to_dict() for r in reports], default=_json_default)
        return
    frame = pd.concat([r.per_layer for r in reports], ignore_index=True)
    meta = json.dumps([{k: v for k, v in r.to_dict().items() if k != "per_layer"} for r in reports],
                      default=_json_default)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({b"finemoe_predict": meta.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


COMMANDS = [predict_command]
