"""The engine log formats `finemoe import --format` names, each read by its own module, and which
one a file is when `--format auto` can tell (docs/trace-format.md, "Engine formats")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from finemoe.errors import ConfigError
from finemoe.traces.geometry import Geometry
from finemoe.traces.schema import Trace


@dataclass(frozen=True)
class EngineFormat:
    name: str
    what: str  # one line for the import report
    sniff: Callable[[Path], bool]
    load: Callable[[Sequence[Path], Geometry, int | None], Trace]  # (logs, geometry, prompt tokens)


def _vllm(paths, geometry, prompt_tokens):
    from finemoe.traces.importers.vllm_routed import import_vllm_routed

    _no_prompt_option(prompt_tokens, "vllm-routed")
    return import_vllm_routed(paths, geometry)


def _sglang(paths, geometry, prompt_tokens):
    from finemoe.traces.importers.sglang_dump import import_sglang_dump

    _no_prompt_option(prompt_tokens, "sglang-per-token")
    return import_sglang_dump(paths, geometry)


def _llama(paths, geometry, prompt_tokens):
    from finemoe.traces.importers.llama_moe_trace import import_moe_trace

    return import_moe_trace(paths, geometry, prompt_tokens)


def _megatron(paths, geometry, prompt_tokens):
    from finemoe.traces.importers.megatron_router import import_router_trace

    return import_router_trace(paths, geometry, prompt_tokens)


def _no_prompt_option(prompt_tokens, name: str) -> None:
    if prompt_tokens is not None:
        raise ConfigError(f"--prompt-tokens does not apply to --format {name}: its log says where each prompt ends")


def _sniffer(module: str) -> Callable[[Path], bool]:
    def sniff(path: Path) -> bool:
        import importlib

        return importlib.import_module(f"finemoe.traces.importers.{module}").sniff(path)

    return sniff


FORMATS: dict[str, EngineFormat] = {f.name: f for f in (
    EngineFormat("vllm-routed", "vLLM returned routed experts", _sniffer("vllm_routed"), _vllm),
    EngineFormat("sglang-per-token", "SGLang expert distribution recorder (per_token)", _sniffer("sglang_dump"),
                 _sglang),
    EngineFormat("llama-moe-trace", "llama.cpp moe-trace CSV", _sniffer("llama_moe_trace"), _llama),
    EngineFormat("megatron-router", "Megatron-LM router trace", _sniffer("megatron_router"), _megatron),
)}


def detect(path: Path) -> str | None:
    """The one engine format `path` looks like, or None (then it is read as JSON Lines)."""
    hits = [f.name for f in FORMATS.values() if f.sniff(path)]
    return hits[0] if len(hits) == 1 else None
