"""vLLM's returned routed experts (`--enable-return-routed-experts`), saved per request.

What vLLM documents (docs.vllm.ai, "Routed Experts Replay"): a response carries
`prompt_routed_experts`, a [prompt_len, num_moe_layers, top_k] array of expert ids for the prompt
(shared by the completions of that response), and per completion choice `routed_experts`, a
[gen_len, num_moe_layers, top_k] array for the generated tokens; values are expert ids in
[0, num_experts). This importer reads either

- a JSON file holding one such response, a list of them, or JSON Lines of them, where a response
  is `{"prompt_routed_experts": [...], "choices": [{"routed_experts": [...]}, ...]}` or the flat
  `{"prompt_routed_experts": [...], "routed_experts": [...]}`; an optional "id" names it;
- an .npz file with arrays `prompt_routed_experts` and `routed_experts` (one request).

Each completion becomes one request: its prompt rows are the prefill, its generated rows one decode
iteration each. The arrays hold no gate weights, no router probabilities and no timing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finemoe.errors import TraceError
from finemoe.traces.geometry import Geometry
from finemoe.traces.importers.assemble import RoutedSequence, build_trace, check_shape
from finemoe.traces.schema import Trace

KIND = "vllm-routed-experts"
KEYS = ("prompt_routed_experts", "routed_experts")
LACKS = "gate weights, router probabilities, semantic keys, speculative routing, timing"


def sniff(path: Path) -> bool:
    """An .npz with the two arrays, or JSON whose first object names prompt_routed_experts."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                return set(KEYS) <= set(z.files)
        with open(path, "rb") as fh:
            head = fh.read(4096)
        return b'"prompt_routed_experts"' in head
    except (OSError, ValueError):
        return False


def _responses(path: Path) -> list[dict]:
    if path.suffix == ".npz":
        try:
            with np.load(path) as z:
                return [{k: z[k] for k in KEYS if k in z.files}]
        except (OSError, ValueError) as exc:
            raise TraceError(f"{path}: not a readable .npz file ({exc})") from None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read it as text ({exc})") from None
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError:
                    raise TraceError(f"{path}: line {n} is not JSON (expected a vLLM response per line)") from None
    if not all(isinstance(r, dict) for r in items):
        raise TraceError(f"{path}: expected vLLM response objects with prompt_routed_experts")
    return items


def _ids(value, what: str, where: str, geometry: Geometry) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.int64)
    except (ValueError, TypeError):
        raise TraceError(f"{where}: {what} is not a [tokens, layers, top-k] array of whole numbers") from None
    if a.size == 0:
        return np.zeros((0, geometry.num_layers, geometry.top_k), np.int64)
    check_shape(a.shape, geometry, what, where)
    return a


def read_vllm_routed(path: Path, geometry: Geometry) -> list[RoutedSequence]:
    """The completions of one file as routed sequences, in file order."""
    out = []
    for n, resp in enumerate(_responses(path)):
        name = str(resp.get("id", n))
        where = f"{path.name} response {name}"
        if "prompt_routed_experts" not in resp:
            raise TraceError(f"{where}: no prompt_routed_experts (start vLLM with --enable-return-routed-experts)")
        prompt = _ids(resp["prompt_routed_experts"], "prompt_routed_experts", where, geometry)
        choices = resp.get("choices")
        if choices is None:
            choices = [{"routed_experts": resp.get("routed_experts", [])}]
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise TraceError(f"{where}: choices must be a list of objects with routed_experts")
        for i, choice in enumerate(choices):
            gen = _ids(choice.get("routed_experts", []), "routed_experts", f"{where} choice {i}", geometry)
            label = f"{path.stem}/{name}" + (f"/{choice.get('index', i)}" if len(choices) > 1 else "")
            out.append(RoutedSequence(label, prompt.shape[0], np.concatenate([prompt, gen])))
    return out


def import_vllm_routed(paths, geometry: Geometry) -> Trace:
    paths = [Path(p) for p in paths]
    seqs = [s for p in paths for s in read_vllm_routed(p, geometry)]
    return build_trace(seqs, geometry, kind=KIND, files=paths, lacks=LACKS)
