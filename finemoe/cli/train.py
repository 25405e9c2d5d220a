"""`finemoe train-demo-model`: train the small embedded MoE shipped in finemoe/data/demo-moe."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import click

from finemoe.cli.options import output_option
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
@output_option("output", kind="dir", default="demo-moe",
               help="Checkpoint folder to write, a new folder in the current directory by default.")
@click.option("--force", is_flag=True,
              help="Allow writing into the installed package's own data folder (replaces the shipped checkpoint).")
@_config_options
def train_demo_model(output: str, force: bool, **overrides) -> None:
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
    from finemoe.demo_model.train import train

    check_not_package_data(output, force)
    cfg = TrainConfig(**overrides)
    record = train(cfg, output, log=lambda line: click.echo(line, err=True))
    final = record["final"]
    click.echo(
        f"wrote {output}: held-out loss {final['heldout_loss']:.3f}, usage entropy per layer "
        f"{', '.join(f'{e:.2f}' for e in final['usage_entropy_bits'])} bits, mean top-1 prob "
        f"{', '.join(f'{p:.2f}' for p in final['mean_top1_prob'])} ({record['train_time_s']:.0f} s)"
    )


def check_not_package_data(output: str, force: bool) -> None:
    """ConfigError when `output` is inside the installed package's data folder (the shipped demo
    checkpoint lives there, and the demo, the tests and `collect` load it) and --force is not given;
    checked before any training starts."""
    from finemoe.demo_model.model import demo_model_dir
    from finemoe.errors import ConfigError

    data = demo_model_dir().parent.resolve()
    target = Path(output).expanduser().resolve()
    if not force and (target == data or data in target.parents):
        raise ConfigError(f"-o {output} is inside the package's own data folder {data}, which holds the shipped "
                          "demo checkpoint; write elsewhere, or pass --force to replace it")


COMMANDS = [train_demo_model]
