"""`finemoe import`: convert routing logs of other tools (JSON Lines) into a trace."""

from __future__ import annotations

import click

from finemoe.errors import ConfigError

_SIZES = ("num_layers", "num_experts", "top_k", "hidden_size", "expert_intermediate_size")


def _parse_prompt_tokens(spec: str | None):
    """'135' -> 135 for every request; 'humaneval/0=135,gsm8k/0=40' -> per label."""
    if spec is None:
        return None
    spec = spec.strip()
    if "=" not in spec:
        try:
            return int(spec)
        except ValueError:
            raise ConfigError(f"--prompt-tokens {spec!r}: give a number or LABEL=N pairs separated by commas") from None
    out = {}
    for part in spec.split(","):
        label, _, value = part.rpartition("=")
        try:
            out[label.strip()] = int(value)
        except ValueError:
            raise ConfigError(f"--prompt-tokens: {part!r} is not LABEL=N with a whole number N") from None
    return out


@click.command("import")
@click.argument("logs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Trace file to write (Parquet; written atomically).")
@click.option("--model-profile", help="Built-in model geometry, e.g. mixtral-8x7b (see the list in the error "
              "message of an unknown name). Routing logs rarely say which model wrote them.")
@click.option("--dtype", help="Weight dtype for expert/dense bytes (default: the profile's, or bfloat16).")
@click.option("--num-layers", type=int, help="Explicit geometry: MoE layers (instead of --model-profile).")
@click.option("--num-experts", type=int, help="Explicit geometry: routed experts per layer.")
@click.option("--top-k", type=int, help="Explicit geometry: experts per token per layer.")
@click.option("--hidden-size", type=int, help="Explicit geometry: model hidden size.")
@click.option("--expert-intermediate-size", type=int, help="Explicit geometry: one expert's FFN width.")
@click.option("--num-shared-experts", type=int, default=0, show_default=True)
@click.option("--dense-bytes", type=int, default=0, show_default=True,
              help="Explicit geometry: bytes always on the GPU (attention, embeddings, shared experts).")
@click.option("--kv-bytes-per-token", type=int, default=0, show_default=True)
@click.option("--request-key", default="dataset,problem_id", show_default=True,
              help="Fields that name a request, comma separated; '@file' stands for the log's file name.")
@click.option("--token-key", default="token_idx", show_default=True, help="Decode-token index field.")
@click.option("--position-key", default="token_pos", show_default=True, help="Position field (prefill+decode logs).")
@click.option("--layer-key", default="layer", show_default=True)
@click.option("--experts-key", default="experts", show_default=True)
@click.option("--weights-key", default="gating_probs", show_default=True)
@click.option("--layout", type=click.Choice(["auto", "decode", "positions", "steps"]), default="auto",
              show_default=True, help="How the token field counts; see below.")
@click.option("--prompt-tokens", help="Prompt length: N for every request, or LABEL=N,... per request.")
@click.option("--prompt-tokens-from", multiple=True, type=click.Path(dir_okay=False),
              help="A log that recorded the prefill of the same requests (layout steps); its prefill "
              "length becomes the prompt length here. Repeatable.")
@click.option("--decode-tokens-from", multiple=True, type=click.Path(dir_okay=False),
              help="A decode-only log of the same requests: for a 'positions' log, prompt = positions "
              "- its decode tokens. Repeatable.")
def import_command(logs, output, model_profile, dtype, request_key, token_key, position_key, layer_key,
                   experts_key, weights_key, layout, prompt_tokens, prompt_tokens_from, decode_tokens_from,
                   num_shared_experts, dense_bytes, kv_bytes_per_token, **sizes) -> None:
    """Convert routing logs (JSON Lines, one record per token and layer) into a trace.

    \b
    A record names its request, layer, token, top-k experts and gate weights:
      {"dataset": "gsm8k", "problem_id": 0, "layer": 3, "token_idx": 7,
       "experts": [5, 1], "gating_probs": [0.8, 0.2]}
    Records may come in any order; several logs go into one trace.

    \b
    --layout says how the token field counts:
      decode     decode tokens only (token_idx): token t is iteration t+1, no prefill
      positions  absolute positions, prompt first: needs --prompt-tokens or
                 --decode-tokens-from, because the log cannot show where the prompt ends
      steps      index inside an engine step (vLLM hooks: every decode token logs 0);
                 steps are told apart by write order, the first one is the prefill
      auto       decode if records carry --token-key, else steps if a (layer, position)
                 repeats within a request, else positions

    \b
    A (token, layer) record absent from a log is stored as missing (expert -1, weight 0)
    and reported; nothing is invented. Decode-only logs do not show the prompt length:
    give --prompt-tokens or --prompt-tokens-from, or it is recorded as unknown (0).

    \b
    Example (the real Mixtral logs):
      finemoe import gsm8k_2_routing.jsonl humaneval_2_routing.jsonl \\
          --model-profile mixtral-8x7b -o mixtral.parquet
    """
    from pathlib import Path

    from finemoe.traces.importers.jsonl import FieldMap, explicit_geometry, import_jsonl
    from finemoe.traces.io import write_trace
    from finemoe.traces.profiles import get_profile

    given = {k: v for k, v in sizes.items() if v is not None}
    if model_profile:
        if given:
            raise ConfigError(f"give either --model-profile or explicit sizes, not both (got --{next(iter(given)).replace('_', '-')})")
        geometry = get_profile(model_profile).geometry(dtype)
    else:
        lacking = [k for k in _SIZES if k not in given]
        if lacking:
            raise ConfigError(
                "routing logs do not say which model wrote them: give --model-profile NAME or all of "
                + ", ".join("--" + k.replace("_", "-") for k in _SIZES)
                + f" (missing {', '.join('--' + k.replace('_', '-') for k in lacking)})"
            )
        geometry = explicit_geometry(**given, dtype=dtype or "bfloat16", num_shared_experts=num_shared_experts,
                                     dense_bytes=dense_bytes, kv_bytes_per_token=kv_bytes_per_token)
    fields = FieldMap(
        request_key=tuple(k.strip() for k in request_key.split(",") if k.strip()),
        token_key=token_key, position_key=position_key, layer_key=layer_key,
        experts_key=experts_key, weights_key=weights_key,
    )
    trace, report = import_jsonl(
        logs, geometry, fields=fields, layout=layout,
        prompt_tokens=_parse_prompt_tokens(prompt_tokens),
        prompt_tokens_from=prompt_tokens_from, decode_tokens_from=decode_tokens_from,
        progress=len(logs) > 3,
    )
    path = write_trace(trace, output)
    for line in report.lines():
        click.echo(line)
    size = Path(path).stat().st_size
    click.echo(f"wrote {path}: {trace.num_tokens:,} tokens, {geometry.num_layers} layers x "
               f"{geometry.num_experts} experts, top-{geometry.top_k}, {size / 1e6:.2f} MB")


COMMANDS = [import_command]
