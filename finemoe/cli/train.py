"""`finemoe train-demo-model`: train the small embedded MoE shipped in finemoe/data/demo-moe."""

from __future__ import annotations

from dataclasses import fields

import click

from finemoe.demo_model.train import TrainConfig


def _config_options(func):
    """One --flag per TrainConfig field, defaulting to the dataclass value (configured in one place)."""
    for f in reversed(fields(TrainConfig)):
        default = f.default
        func = click.option(
            f"--{f.name.replace('_', '-')}",
            f.name,
            type=type(default),
            default=default,
            show_default=True,
        )(func)
    return func


@click.command("train-demo-model")
@click.option(
    "-o", "--output", "output", type=click.Path(file_okay=False), default=None,
    help="Checkpoint folder to write (default: the package's own finemoe/data/demo-moe).",
)
@_config_options
def train_demo_model(output: str | None, **overrides) -> None:
    """Train the embedded demo MoE (a tiny Mixtral on ShareGPT bytes) on the CPU.

    \b
    The shipped checkpoint came from the defaults below on one CPU thread: about 13 minutes on an
    idle core (28 on the shared machine it was trained on):
      finemoe train-demo-model -o my-demo-moe
    A quick smoke run:
      finemoe train-demo-model -o /tmp/moe --max-steps 20 --eval-every 10 --train-conversations 50
    The folder holds config.json, model.safetensors, tokenizer.json and training.json (every
    setting and the held-out metrics). `finemoe collect --model my-demo-moe` then traces it.
    """
    from finemoe.demo_model.model import demo_model_dir
    from finemoe.demo_model.train import train

    cfg = TrainConfig(**overrides)
    out = output or str(demo_model_dir())
    record = train(cfg, out, log=lambda line: click.echo(line, err=True))
    final = record["final"]
    click.echo(
        f"wrote {out}: held-out loss {final['heldout_loss']:.3f}, usage entropy per layer "
        f"{', '.join(f'{e:.2f}' for e in final['usage_entropy_bits'])} bits, mean top-1 prob "
        f"{', '.join(f'{p:.2f}' for p in final['mean_top1_prob'])} ({record['train_time_s']:.0f} s)"
    )


COMMANDS = [train_demo_model]
