"""`finemoe import`: convert routing logs of other tools (JSON Lines) into a trace."""

from __future__ import annotations

import click

from finemoe.cli.options import quiet_option
from finemoe.errors import ConfigError
from finemoe.traces.importers.formats import FORMATS as ENGINE_FORMATS

_SIZES = ("num_layers", "num_experts", "top_k", "hidden_size", "expert_intermediate_size")


def _int_list(text: str, option: str) -> list[int]:
    """'5,7,3' or '@FILE' (integers separated by commas or white space, or a JSON list of numbers
    or of token-id lists) -> lengths."""
    import json
    from pathlib import Path

    if text.startswith("@"):
        try:
            body = Path(text[1:]).read_text()
        except OSError as exc:
            raise ConfigError(f"{option} {text}: cannot read the file ({exc.strerror})") from None
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            data = body.replace(",", " ").split()
        if isinstance(data, list):
            data = [len(v) if isinstance(v, list) else v for v in data]
        text = ",".join(str(v) for v in (data if isinstance(data, list) else [data]))
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: give whole numbers separated by commas") from None
    if not values or min(values) < 0:
        raise ConfigError(f"{option}: give at least one length, none negative")
    return values


def _parse_where(items) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--where {item!r}: give FIELD=VALUE, e.g. --where type=route")
        out[key.strip()] = value.strip()
    return out


def _parse_prompt_tokens(spec: str | None):
    """'135' -> 135 for every request; 'humaneval/0=135,gsm8k/0=40' -> per label; '5,7,3' or '@FILE'
    -> lengths in admission order (layout batched)."""
    if spec is None:
        return None
    spec = spec.strip()
    if spec.startswith("@") or ("," in spec and "=" not in spec):
        return _int_list(spec, "--prompt-tokens")
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
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Trace file to write (Parquet; written atomically).")
@click.option("--model-profile", help="Built-in model geometry, e.g. mixtral-8x7b (see the list in the error "
              "message of an unknown name). Routing logs rarely say which model wrote them.")
@click.option("--model-config", type=click.Path(dir_okay=False),
              help="The model's Hugging Face config.json (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, PhiMoE, "
              "GPT-OSS), for a model with no built-in profile.")
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
@click.option("--layout", type=click.Choice(["auto", "decode", "positions", "steps", "batched"]), default="auto",
              show_default=True, help="How the token field counts; see below.")
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "route-trace", *ENGINE_FORMATS]),
              default="auto", show_default=True,
              help="Log format; auto: route-trace for a '# route_trace v1' file, an engine format when the "
                   "file is unmistakably one (see below), else jsonl.")
@click.option("--where", multiple=True, metavar="FIELD=VALUE",
              help="Keep only records whose FIELD has this value (e.g. type=route). Repeatable.")
@click.option("--prompt-tokens", help="Prompt length: N for every request, LABEL=N,... per request, or "
              "(layout batched) N1,N2,... or @FILE: the prompts' lengths in admission order.")
@click.option("--generated-tokens", help="Layout batched: decode steps per sequence, D1,D2,... or @FILE, "
              "in admission order; tells where sequences end.")
@click.option("--skip-steps", type=int, default=0, show_default=True,
              help="Layout batched: drop this many leading engine steps (warm-up, profiling).")
@click.option("--warmup", type=click.Choice(["auto", "keep"]), default="auto", show_default=True,
              help="Layout batched: after --skip-steps, also drop leading steps that are uniform (every "
              "record's weights equal) or hold more rows than all prompts (auto), or keep them.")
@click.option("--engine-cache", help="route-trace: the engine's own expert cache size (e.g. 4000MiB), "
              "to set the simulator's LRU beside its hit counters.")
@click.option("--inspect", "inspect_only", is_flag=True,
              help="Show the first records, the fields found and the layout auto would pick; write nothing.")
@click.option("--prompt-tokens-from", multiple=True, type=click.Path(dir_okay=False),
              help="A log that recorded the prefill of the same requests (layout steps); its prefill "
              "length becomes the prompt length here. Repeatable.")
@click.option("--decode-tokens-from", multiple=True, type=click.Path(dir_okay=False),
              help="A decode-only log of the same requests: for a 'positions' log, prompt = positions "
              "- its decode tokens. Repeatable.")
@quiet_option("No progress bar (shown on stderr for more than 3 logs otherwise).")
def import_command(logs, output, model_profile, model_config, dtype, request_key, token_key, position_key, layer_key,
                   experts_key, weights_key, layout, prompt_tokens, prompt_tokens_from, decode_tokens_from,
                   num_shared_experts, dense_bytes, kv_bytes_per_token, fmt, where, generated_tokens,
                   skip_steps, warmup, engine_cache, inspect_only, quiet, **sizes) -> None:
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
      batched    row inside a batched engine step, one request id for all: a step's
                 rows are one decode token per running sequence, then new prompts back
                 to back (--prompt-tokens N1,N2,..., --generated-tokens, --skip-steps)
      auto       decode if records carry --token-key, else steps if a (layer, position)
                 repeats within a request, else positions

    \b
    A (token, layer) record absent from a log is stored as missing (expert -1, weight 0)
    and reported; nothing is invented. Decode-only logs do not show the prompt length:
    give --prompt-tokens or --prompt-tokens-from, or it is recorded as unknown (0).

    \b
    The engines' own formats (--format, or auto when a file is plainly one of them):
      vllm-routed       vLLM's returned routed experts (JSON responses or .npz)
      sglang-per-token  SGLang's expert distribution recorder dump, per_token mode (.pt/.json)
      llama-moe-trace   llama.cpp moe-trace CSV (layer,expert rows; --prompt-tokens N)
      megatron-router   Megatron-LM router_trace_rank*.jsonl (--prompt-tokens N)
    They carry expert ids only; give the model (--model-profile, --model-config or sizes).

    \b
    Example (the real Mixtral logs):
      finemoe import gsm8k_2_routing.jsonl humaneval_2_routing.jsonl \\
          --model-profile mixtral-8x7b -o mixtral.parquet
    """
    from pathlib import Path

    from finemoe.traces.importers import route_trace
    from finemoe.traces.importers.bounds import check_lengths
    from finemoe.traces.importers.jsonl import FieldMap, explicit_geometry, import_jsonl, read_head
    from finemoe.traces.io import require_regular_file, write_trace
    from finemoe.traces.profiles import get_profile

    for log in (*logs, *prompt_tokens_from, *decode_tokens_from):
        require_regular_file(log, "routing log")  # before anything opens it: a FIFO would block forever
    fields = FieldMap(
        request_key=tuple(k.strip() for k in request_key.split(",") if k.strip()),
        token_key=token_key, position_key=position_key, layer_key=layer_key,
        experts_key=experts_key, weights_key=weights_key,
    )
    where_map = _parse_where(where)
    if inspect_only:
        from finemoe.traces.importers.inspector import inspect_log

        for log in logs:
            for line in inspect_log(log, fields, where_map):
                click.echo(line)
        return
    if not output:
        raise ConfigError("give the trace to write with -o/--output (or --inspect to only look at the logs)")
    given = {k: v for k, v in sizes.items() if v is not None}
    if model_config and (model_profile or given):
        raise ConfigError("give one of --model-profile, --model-config and explicit sizes")
    profile = None
    if model_config:
        from finemoe.traces.model_config import profile_from_config

        profile = profile_from_config(model_config)
    elif model_profile:
        profile = get_profile(model_profile)
    if fmt == "route-trace" or (fmt == "auto" and len(logs) == 1 and route_trace.sniff(Path(logs[0]))):
        _import_route_trace(logs, output, profile, dtype, engine_cache, sizes)
        return
    engine_format = fmt if fmt in ENGINE_FORMATS else None
    if fmt == "auto":
        from finemoe.traces.importers.formats import detect

        found = {detect(Path(log)) for log in logs if Path(log).is_file()}
        engine_format = found.pop() if len(found) == 1 else None
    if not profile and not given and not engine_format and Path(logs[0]).is_file():
        named = _profile_from_header(read_head(logs[0], where_map).meta)
        profile = get_profile(named) if named else None
    if profile:
        if given:
            raise ConfigError(f"give either --model-profile or explicit sizes, not both (got --{next(iter(given)).replace('_', '-')})")
        geometry = profile.geometry(dtype)
    else:
        lacking = [k for k in _SIZES if k not in given]
        if lacking:
            raise ConfigError(
                "routing logs do not say which model wrote them: give --model-profile NAME, --model-config config.json or all of "
                + ", ".join("--" + k.replace("_", "-") for k in _SIZES)
                + f" (missing {', '.join('--' + k.replace('_', '-') for k in lacking)})"
            )
        geometry = explicit_geometry(**given, dtype=dtype or "bfloat16", num_shared_experts=num_shared_experts,
                                     dense_bytes=dense_bytes, kv_bytes_per_token=kv_bytes_per_token)
    if engine_format:
        _import_engine_format(engine_format, logs, output, geometry, prompt_tokens)
        return
    if skip_steps < 0:
        raise ConfigError(f"--skip-steps must not be negative, got {skip_steps}")
    trace, report = import_jsonl(
        logs, geometry, fields=fields, layout=layout,
        prompt_tokens=check_lengths(_parse_prompt_tokens(prompt_tokens), "--prompt-tokens"),
        prompt_tokens_from=prompt_tokens_from, decode_tokens_from=decode_tokens_from,
        progress=not quiet and len(logs) > 3, where=where_map,
        generated_tokens=check_lengths(_int_list(generated_tokens, "--generated-tokens") if generated_tokens else None,
                                       "--generated-tokens"),
        skip_steps=skip_steps, detect_warmup=warmup == "auto",
    )
    path = write_trace(trace, output)
    for line in report.lines():
        click.echo(line)
    size = Path(path).stat().st_size
    click.echo(f"wrote {path}: {trace.num_tokens:,} tokens, {geometry.num_layers} layers x "
               f"{geometry.num_experts} experts, top-{geometry.top_k}, {size / 1e6:.2f} MB")



def _import_engine_format(name: str, logs, output, geometry, prompt_tokens: str | None) -> None:
    """An engine's own format (vLLM, SGLang, llama.cpp, Megatron-LM) read by its module."""
    from pathlib import Path

    from finemoe.errors import TraceError
    from finemoe.traces.io import write_trace

    paths = [Path(p) for p in logs]
    for p in paths:
        if not p.is_file():
            raise TraceError(f"{p}: no such routing log")
    prompt = None
    if prompt_tokens is not None:
        prompt = _parse_prompt_tokens(prompt_tokens)
        if not isinstance(prompt, int) or prompt < 1:
            raise ConfigError(f"--format {name} takes --prompt-tokens N: one prompt length, at least 1")
    fmt = ENGINE_FORMATS[name]
    trace = fmt.load(paths, geometry, prompt)
    path = write_trace(trace, output)
    source = trace.metadata["source"]
    dec = sum(r.generated_tokens - (1 if r.has_prefill else 0) for r in trace.requests)
    click.echo(f"{len(paths)} file(s) as {fmt.what}: {len(trace.requests)} request(s), "
               f"{sum(r.prompt_tokens for r in trace.requests):,} prompt and {dec:,} decode tokens, "
               f"{trace.num_missing} (token, layer) records missing")
    if trace.is_partial:
        layers = trace.logged_layers
        click.echo(f"layers logged: {len(layers)} ({', '.join(map(str, layers[:8]))}"
                   f"{', ...' if len(layers) > 8 else ''}); the trace records which, the others are not in the log")
    click.echo(f"the log lacks: {source['lacks']}; {source['gate']}")
    g = trace.geometry
    click.echo(f"wrote {path}: {trace.num_tokens:,} tokens, {g.num_layers} layers x {g.num_experts} experts, "
               f"top-{g.top_k}, {Path(path).stat().st_size / 1e6:.2f} MB")


def _profile_from_header(meta: dict) -> str | None:
    """The built-in profile a log header's model_id names (e.g. Qwen/Qwen1.5-MoE-A2.7B), if any."""
    from finemoe.traces.profiles import PROFILES

    model_id = str(meta.get("model_id", "")).lower()
    if not model_id:
        return None
    for name, profile in PROFILES.items():
        if model_id in (name, profile.source.split(" ")[0].lower()):
            return name
    return None


def _import_route_trace(logs, output, prof, dtype, engine_cache, sizes) -> None:
    """A route_trace v1 CSV: geometry from its header; hidden sizes from a profile or the options."""
    from pathlib import Path

    from finemoe.sim.sweep import parse_sizes
    from finemoe.traces.importers.route_trace import import_route_trace
    from finemoe.traces.io import write_trace

    if len(logs) != 1:
        raise ConfigError("import one route_trace file at a time")
    hidden, inter = sizes.get("hidden_size"), sizes.get("expert_intermediate_size")
    if prof is not None:
        hidden, inter = hidden or prof.hidden_size, inter or prof.expert_intermediate_size
    if not hidden or not inter:
        raise ConfigError("a route_trace header gives layers, experts, top-k and bytes but not the model's widths: "
                          "give --model-profile NAME or --hidden-size and --expert-intermediate-size")
    capacity = parse_sizes(engine_cache, "--engine-cache")[0] if engine_cache else None
    trace = import_route_trace(logs[0], hidden_size=hidden, expert_intermediate_size=inter,
                               engine_cache_bytes=capacity, dtype=dtype or "int4")
    path = write_trace(trace, output)
    g = trace.geometry
    eng = trace.metadata["engine_cache"]
    click.echo(f"{Path(logs[0]).name}: route_trace v1, {len(trace.requests)} request(s), "
               f"{trace.num_missing} (token, layer) records missing; top-k weights only (no router probabilities)")
    click.echo(f"engine cache hits kept: decode {eng['hits']['decode']:,} of {eng['accesses']['decode']:,} "
               f"accesses, prefill {eng['hits']['prefill']:,} of {eng['accesses']['prefill']:,}")
    if capacity:
        from finemoe.sim.engine_check import check_engine_cache

        click.echo(check_engine_cache(trace).line())
    click.echo(f"wrote {path}: {trace.num_tokens:,} tokens, {g.num_layers} layers x {g.num_experts} experts, "
               f"top-{g.top_k}, mean expert {g.bytes_per_expert:,} bytes")


COMMANDS = [import_command]
