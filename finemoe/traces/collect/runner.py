"""Run generate() over prompts with routing hooks and turn what they saw into a trace.

A batch is left-padded; padding positions and the steps after a request produced its end-of-text
token are dropped, so the trace holds exactly the tokens a server would have routed for each request.
Iteration 0 is the prefill (every prompt token), iteration i >= 1 processes generated token i.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from finemoe.errors import ConfigError
from finemoe.traces.collect.adapters import PROBS_NOTE, architecture_of, geometry_of
from finemoe.traces.collect.hooks import RoutingRecorder
from finemoe.traces.geometry import Geometry
from finemoe.traces.parts import PartWriter, concat_traces
from finemoe.traces.prompts import Prompt
from finemoe.traces.schema import RequestInfo, Trace

CHAT_TAIL_TOKENS = 16  # tokens kept from the end of a too-long chat prompt (the assistant header)


@dataclass(frozen=True)
class CollectConfig:
    max_new_tokens: int = 64
    batch_size: int = 1
    seed: int = 0
    greedy: bool = False  # True: ignore the model's sampling settings and decode greedily
    router_probs: bool = True
    speculative: bool = True
    semantic_dim: int = 256  # project the embedding output to this width when it is wider; 0: never
    max_prompt_tokens: int = 512
    chat_template: bool = True
    flush_every_s: float = 30.0  # finished requests reach a part file on disk at least this often

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "max_prompt_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.semantic_dim < 0:
            raise ConfigError(f"semantic-dim must not be negative, got {self.semantic_dim}")


class PromptEncoder:
    """Prompt text to token ids, via the byte tokenizer or a Hugging Face tokenizer's chat template."""

    def __init__(self, tokenizer, *, chat_template: bool, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.byte_level = hasattr(tokenizer, "encode_chat")
        self.uses_template = chat_template and (
            self.byte_level or bool(getattr(tokenizer, "chat_template", None))
        )
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0

    def encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        if self.byte_level:
            if self.uses_template:
                body = tok.encode(text, bos=False)[: self.max_tokens - 3]
                return [tok.bos_token_id, tok.user_token_id, *body, tok.assistant_token_id]
            return tok.encode(text)[: self.max_tokens]
        if self.uses_template:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            ids = list(ids)
            if len(ids) > self.max_tokens:
                ids = ids[: self.max_tokens - CHAT_TAIL_TOKENS] + ids[-CHAT_TAIL_TOKENS:]
            return ids
        return list(tok(text)["input_ids"])[: self.max_tokens]


def eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def semantic_projection(hidden: int, dim: int, seed: int) -> torch.Tensor | None:
    """A fixed Gaussian projection (scaled by 1/sqrt(dim)); None when the embedding is narrow enough."""
    if dim == 0 or hidden <= dim:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(hidden, dim, generator=gen) / math.sqrt(dim)


def collect(
    model,
    tokenizer,
    prompts: list[Prompt],
    output: str | Path,
    config: CollectConfig = CollectConfig(),
    *,
    model_name: str = "",
    metadata: dict | None = None,
    progress: bool = True,
) -> Path | None:
    """Collect a trace of `prompts` into `output`; returns its path (None if nothing finished).

    Requests are written as they finish; on Ctrl-C or an error the finished ones are published as
    a valid, shorter trace (metadata `complete: false`) and the exception propagates.
    """
    from tqdm.auto import tqdm

    if not prompts:
        raise ConfigError("no prompts to collect")
    arch = architecture_of(model.config)
    name = model_name or getattr(model.config, "name_or_path", "") or arch.model_type
    geometry = geometry_of(model, name=name)
    encoder = PromptEncoder(tokenizer, chat_template=config.chat_template, max_tokens=config.max_prompt_tokens)
    projection = semantic_projection(geometry.hidden_size, config.semantic_dim, config.seed)
    meta = _metadata(model, arch, config, encoder, projection, geometry, len(prompts), metadata or {})
    eos = eos_ids(model, tokenizer)
    writer = PartWriter(output)
    model.eval()
    bar = tqdm(total=len(prompts), unit="req", desc="collect", disable=not progress)
    generated, t0 = 0, time.perf_counter()
    pending: list[Trace] = []  # finished requests not yet on disk; published on any exit
    last_flush = t0
    try:
        with RoutingRecorder(
            model, arch, router_probs=config.router_probs, speculative=config.speculative, projection=projection
        ) as recorder:
            for first in range(0, len(prompts), config.batch_size):
                batch = prompts[first : first + config.batch_size]
                piece = _collect_batch(model, recorder, encoder, batch, first, config, eos, geometry, meta)
                pending.append(piece)
                if time.perf_counter() - last_flush >= config.flush_every_s:
                    writer.write(concat_traces(pending))
                    pending, last_flush = [], time.perf_counter()
                generated += sum(r.generated_tokens for r in piece.requests)
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{generated / max(time.perf_counter() - t0, 1e-9):.1f}")
    except BaseException:
        bar.close()
        done = writer.num_requests + sum(len(p.requests) for p in pending)
        writer.finish(pending, metadata_update={"complete": False, "requests_collected": done})
        raise
    bar.close()
    done = writer.num_requests + sum(len(p.requests) for p in pending)
    return writer.finish(pending, metadata_update={"complete": True, "requests_collected": done})


def _metadata(model, arch, config, encoder, projection, geometry: Geometry, planned: int, extra: dict) -> dict:
    import transformers

    gen = model.generation_config
    sampling = (not config.greedy) and bool(getattr(gen, "do_sample", False))
    semantic = {"source": "input embedding output, one row per token", "input_dim": geometry.hidden_size}
    if projection is None:
        semantic.update(projection="none", dim=geometry.hidden_size)
    else:
        semantic.update(
            projection="gaussian N(0, 1/dim), torch.Generator seeded", dim=int(projection.shape[1]), seed=config.seed
        )
    return {
        "source": {"kind": "collect", "model": geometry.model_name, "architecture": arch.model_type},
        "collector": {
            **asdict(config),
            "architecture": arch.model_type,
            "sampling": sampling,
            "temperature": float(getattr(gen, "temperature", 1.0) or 1.0) if sampling else None,
            "top_p": float(getattr(gen, "top_p", 1.0) or 1.0) if sampling else None,
            "chat_template_used": encoder.uses_template,
            "requests_planned": planned,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            **extra,
        },
        "router_probs": PROBS_NOTE[arch.probs] if config.router_probs else None,
        "semantic_key": semantic,
        "speculative": (
            "layer l+1's router (through its post-attention norm) applied to the hidden state entering "
            "layer l; the last layer has none (-1)"
            if config.speculative
            else None
        ),
    }


def _collect_batch(model, recorder, encoder, batch, first_id, config, eos, geometry, meta) -> Trace:
    ids = [encoder.encode(p.text) for p in batch]
    if any(len(x) == 0 for x in ids):
        empty = next(p.label for p, x in zip(batch, ids, strict=True) if len(x) == 0)
        raise ConfigError(f"prompt {empty} encodes to no tokens")
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), encoder.pad_id, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x) :] = torch.tensor(x)
        attention[row, width - len(x) :] = 1
    recorder.finish()  # drop anything left from an earlier, interrupted call
    device = next(model.parameters()).device
    input_ids, attention = input_ids.to(device), attention.to(device)
    torch.manual_seed(config.seed + first_id)
    kwargs = {"do_sample": False} if config.greedy else {}
    with torch.no_grad():
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=config.max_new_tokens,
            pad_token_id=encoder.pad_id,
            eos_token_id=eos or None,
            **kwargs,
        )
    steps = recorder.finish()
    new = sequences[:, width:].cpu()
    if len(steps) != new.shape[1]:
        raise RuntimeError(f"recorded {len(steps)} forward passes for {new.shape[1]} generated tokens")
    requests, pieces = [], []
    for row, prompt in enumerate(batch):
        produced = new[row].tolist()
        ended = [i for i, t in enumerate(produced) if t in eos]
        generated = ended[0] + 1 if ended else len(produced)
        rid = first_id + row
        requests.append(RequestInfo(rid, len(ids[row]), generated, True, label=prompt.label))
        pieces.append(_request_rows(steps, row, width, len(ids[row]), generated, rid, new))
    return _assemble(pieces, requests, geometry, meta)


def _request_rows(steps: list[dict], row: int, width: int, prompt_len: int, generated: int, rid: int, new):
    """Per-token arrays of one request: real prompt columns of the prefill, then one per decode step."""
    keys = ("experts", "weights", "probs", "spec_experts", "spec_weights")
    out = {k: [] for k in ("iteration", "position", "semantic", *keys)}
    for it in range(generated):
        step = steps[it]
        seq = step["input_ids"].shape[1]
        if it == 0:
            cols = np.arange(width - prompt_len, width)
            positions = np.arange(prompt_len)
        else:
            fed = int(step["input_ids"][row, -1])
            if fed != int(new[row, it - 1]):
                raise RuntimeError(f"step {it} fed token {fed}, generated {int(new[row, it - 1])}")
            cols = np.array([seq - 1])
            positions = np.array([prompt_len + it - 1])
        flat = row * seq + cols
        out["iteration"].append(np.full(len(cols), it, np.int32))
        out["position"].append(positions.astype(np.int32))
        for key in keys:
            if step[key] is not None:
                out[key].append(step[key][flat])
        if step["semantic"] is not None:
            out["semantic"].append(step["semantic"][row, cols])
    return {k: (np.concatenate(v) if v else None) for k, v in out.items()} | {"rid": rid}


def _assemble(pieces: list[dict], requests: list[RequestInfo], geometry: Geometry, meta: dict) -> Trace:
    def cat(key, dtype):
        parts = [p[key] for p in pieces]
        if any(x is None for x in parts):
            return None
        return np.concatenate(parts).astype(dtype)

    rid = np.concatenate([np.full(len(p["iteration"]), p["rid"], np.int32) for p in pieces])
    return Trace(
        geometry=geometry,
        requests=tuple(requests),
        request_id=rid,
        iteration=cat("iteration", np.int32),
        position=cat("position", np.int32),
        experts=cat("experts", np.int16),
        weights=cat("weights", np.float16),
        router_probs=cat("probs", np.float16),
        semantic_key=cat("semantic", np.float16),
        spec_experts=cat("spec_experts", np.int16),
        spec_weights=cat("spec_weights", np.float16),
        metadata=meta,
    )
