"""Trace format v1 in memory: one row per token, routing of all layers as fixed-width arrays.

A token is one input position processed in one iteration of one request: the prefill (iteration 0)
processes every prompt token, each decode iteration (1, 2, ...) one token. Rows are sorted by
(request_id, iteration, position). See docs/trace-format.md for the file layout.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property

import numpy as np

from finemoe.traces.geometry import Geometry

SCHEMA_VERSION = 1
MISSING_EXPERT = -1  # experts value of a (token, layer) record absent from the source
# metadata key: the model layers a partial log holds (absent: every layer); the others are all missing
LAYERS_LOGGED_KEY = "layers_logged"


@dataclass(frozen=True)
class RequestInfo:
    request_id: int
    prompt_tokens: int
    generated_tokens: int  # tokens the recorded iterations produced: one per iteration (prefill included)
    has_prefill: bool  # whether iteration 0 (the prompt's routing) is recorded
    label: str = ""  # where it came from, e.g. "gsm8k/0"
    split: str = ""  # "history", "measure" or "" (assigned by the evaluation protocol)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Iteration:
    """Rows [start, stop) of one (request, iteration)."""

    request_id: int
    iteration: int
    start: int
    stop: int

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start


@dataclass
class Trace:
    """Router decisions of a set of requests, as numpy arrays (row = token).

    `experts[row, layer]` holds the top-k expert ids in descending gate weight; a record the source
    lacked is all `MISSING_EXPERT` with zero weights. Optional arrays are None when not recorded.
    """

    geometry: Geometry
    requests: tuple[RequestInfo, ...]
    request_id: np.ndarray  # int32 [n]
    iteration: np.ndarray  # int32 [n]
    position: np.ndarray  # int32 [n]
    experts: np.ndarray  # int16 [n, L, K]
    weights: np.ndarray  # float16 [n, L, K]
    router_probs: np.ndarray | None = None  # float16 [n, L, J]: full softmax, the "expert map" rows
    semantic_key: np.ndarray | None = None  # float16 [n, D]: embedding output (maybe projected)
    spec_experts: np.ndarray | None = None  # int16 [n, L, K]: layer l+1's router on layer l's input
    spec_weights: np.ndarray | None = None  # float16 [n, L, K]
    metadata: dict = field(default_factory=dict)  # source, collector settings, projection, ...

    @property
    def num_tokens(self) -> int:
        return int(self.request_id.shape[0])

    @property
    def missing_mask(self) -> np.ndarray:
        """bool [n, L]: (token, layer) records absent from the source."""
        return self.experts[:, :, 0] == MISSING_EXPERT

    @property
    def num_missing(self) -> int:
        return int(self.missing_mask.sum())

    @property
    def logged_layers(self) -> tuple[int, ...]:
        """The model layers this trace holds routing for (a log may record only some of them)."""
        layers = self.metadata.get(LAYERS_LOGGED_KEY)
        return tuple(range(self.geometry.num_layers)) if layers is None else tuple(int(v) for v in layers)

    @property
    def is_partial(self) -> bool:
        return len(self.logged_layers) < self.geometry.num_layers

    def logged_layers_only(self) -> Trace:
        """The logged layers taken as the model's consecutive layers 0..n-1 (a user's explicit choice,
        for policies that predict across layers); geometry and metadata say so."""
        layers = list(self.logged_layers)
        if len(layers) == self.geometry.num_layers:
            return self

        def take(a):
            return None if a is None else np.ascontiguousarray(a[:, layers])

        meta = {k: v for k, v in self.metadata.items() if k != LAYERS_LOGGED_KEY}
        meta["layers_as_consecutive"] = layers
        return replace(self, geometry=replace(self.geometry, num_layers=len(layers)),
                       experts=take(self.experts), weights=take(self.weights),
                       router_probs=take(self.router_probs), spec_experts=take(self.spec_experts),
                       spec_weights=take(self.spec_weights), metadata=meta)

    @cached_property
    def iterations(self) -> tuple[Iteration, ...]:
        """Every (request, iteration) group in row order."""
        n = self.num_tokens
        if n == 0:
            return ()
        change = np.flatnonzero(
            (np.diff(self.request_id) != 0) | (np.diff(self.iteration) != 0)
        ) + 1
        starts = np.concatenate(([0], change))
        stops = np.concatenate((change, [n]))
        rid = self.request_id[starts]
        it = self.iteration[starts]
        return tuple(
            Iteration(int(r), int(i), int(a), int(b))
            for r, i, a, b in zip(rid, it, starts, stops, strict=True)
        )

    @cached_property
    def iterations_by_request(self) -> dict[int, tuple[Iteration, ...]]:
        out: dict[int, list[Iteration]] = {r.request_id: [] for r in self.requests}
        for it in self.iterations:
            out.setdefault(it.request_id, []).append(it)
        return {k: tuple(v) for k, v in out.items()}

    def request(self, request_id: int) -> RequestInfo:
        for r in self.requests:
            if r.request_id == request_id:
                return r
        raise KeyError(request_id)

    def select_requests(self, request_ids) -> Trace:
        """A trace holding only the given requests (rows copied, order kept)."""
        wanted = set(int(r) for r in request_ids)
        mask = np.isin(self.request_id, np.fromiter(wanted, dtype=np.int64, count=len(wanted)))

        def take(a):
            return None if a is None else a[mask]

        return Trace(
            geometry=self.geometry,
            requests=tuple(r for r in self.requests if r.request_id in wanted),
            request_id=self.request_id[mask],
            iteration=self.iteration[mask],
            position=self.position[mask],
            experts=self.experts[mask],
            weights=self.weights[mask],
            router_probs=take(self.router_probs),
            semantic_key=take(self.semantic_key),
            spec_experts=take(self.spec_experts),
            spec_weights=take(self.spec_weights),
            metadata=dict(self.metadata),
        )

    def with_geometry(self, geometry: Geometry) -> Trace:
        """The same routing under another model's sizes (projection); layers/experts/top-k must match."""
        g = self.geometry
        if (g.num_layers, g.num_experts, g.top_k) != (
            geometry.num_layers,
            geometry.num_experts,
            geometry.top_k,
        ):
            from finemoe.errors import ConfigError

            raise ConfigError(
                f"cannot project a trace of {g.num_layers} layers x {g.num_experts} experts, top-{g.top_k} "
                f"onto {geometry.model_name} ({geometry.num_layers} layers x {geometry.num_experts} "
                f"experts, top-{geometry.top_k}): layers, experts and top-k must match"
            )
        meta = dict(self.metadata)
        meta["projected_from"] = g.to_dict()
        return replace(self, geometry=geometry, metadata=meta)  # (not __dict__: it holds cached properties)

    def content_hash(self) -> str:
        """Stable short hash of geometry, requests and routing: identifies a trace in results.

        Remembered while the fields are the same objects (a sweep of small runs asks once per run
        and per bound); a field assigned anew is hashed again. The arrays are never changed in place.
        """
        fields = self._hashed_fields()
        memo = self.__dict__.get("_content_hash_memo")
        if memo is not None and all(a is b for a, b in zip(memo[0], fields, strict=True)):
            return memo[1]
        digest = self._content_hash()
        self.__dict__["_content_hash_memo"] = (fields, digest)
        return digest

    def _hashed_fields(self) -> tuple:
        return (self.geometry, self.requests, self.request_id, self.iteration, self.position, self.experts,
                self.weights)

    def _content_hash(self) -> str:
        """`content_hash` computed afresh."""
        geometry, requests, *arrays = self._hashed_fields()
        h = hashlib.sha256()
        h.update(json.dumps(geometry.to_dict(), sort_keys=True).encode())
        h.update(json.dumps([r.to_dict() for r in requests], sort_keys=True).encode())
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]
