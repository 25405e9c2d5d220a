"""`finemoe collect`: record what a transformers MoE model routed, through forward hooks only."""

from finemoe.traces.collect.adapters import ARCHITECTURES, architecture_of, geometry_of, moe_layers
from finemoe.traces.collect.runner import CollectConfig, collect

__all__ = ["ARCHITECTURES", "CollectConfig", "architecture_of", "collect", "geometry_of", "moe_layers"]
