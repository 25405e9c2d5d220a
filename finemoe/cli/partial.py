"""`--layers-as-consecutive`, shared by simulate, replay and predict: a log of only some layers
runs with its logged layers as the model's consecutive layers, a choice only the user can make."""

from __future__ import annotations

import click

layers_as_consecutive_option = click.option(
    "--layers-as-consecutive", "layers_as_consecutive", is_flag=True,
    help="On a trace that logs only some layers: take the logged layers as the model's consecutive "
         "layers 0..n-1, so policies that predict across layers can run (without it they refuse). "
         "No effect on a trace of every layer.",
)
