"""ProMoE-style (Song et al., 2024): a small learned predictor of layer l + d's experts, LRU cache.

ProMoE trains per-layer predictors that read layer l's state and guess layer l + d's experts. We
have no hidden states in a trace, so each predictor reads what the router already showed: the
probability rows (or, without them, the top-k gate weights) of layers l-w+1..l of the token. One
multi-label logistic regression per source layer (J sigmoid outputs), trained with Adam on the
history split in numpy; its top-k (at least) is prefetched for layer l + d with priority
probability / d. Layers 0..d-1 of a step are not predicted. Training time is measured and reported
in describe(). With no history (online mode) it retrains after every `retrain_every` finished
requests, on all of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from finemoe.policies.asks import AskBuilder, PlannedAsks, hook_asks
from finemoe.policies.base import (
    ExpertKey,
    LayerRouting,
    PolicyContext,
    Prefetch,
    StepInfo,
    ranked_prefetches,
)
from finemoe.policies.caches import TrackedCachePolicy
from finemoe.policies.expert_maps import topk_map
from finemoe.policies.memo import ContentMemo, digest
from finemoe.policies.registry import register


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def train_logistic(
    x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, l2: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch Adam on mean binary cross-entropy; returns weights [F, J] and bias [J]."""
    rng = np.random.default_rng(seed)
    n, f = x.shape
    w = rng.normal(scale=0.01, size=(f, y.shape[1]))
    prior = np.clip(y.mean(axis=0), 1e-3, 1 - 1e-3)
    b = np.log(prior / (1 - prior))
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    for t in range(1, epochs + 1):
        err = _sigmoid(x @ w + b) - y  # d(BCE)/d(logit)
        grads = [x.T @ err / n + l2 * w, err.mean(axis=0)]
        for k, (param, g) in enumerate(zip((w, b), grads, strict=True)):
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g * g
            param -= lr * (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.999**t)) + 1e-8)
    return w, b


@dataclass(frozen=True)
class _Predictions:
    """Per measured iteration (by its first trace row; a prefill's index is -1 - i): a decode
    token's K experts and priorities per source layer ([n, L, K] arrays: the planned asks read
    them whole), a prefill's merged (target, expert) -> priority per source layer."""

    index_of: dict[int, int]
    expert_array: np.ndarray  # int64 [n, L, K]
    prio_array: np.ndarray  # float64 [n, L, K]
    prefill: list[dict[int, dict[ExpertKey, float]]]

    def to_arrays(self) -> dict[str, np.ndarray]:
        rows = [(i, layer, target, e) for i, layers in enumerate(self.prefill) for layer, out in layers.items()
                for target, e in out]
        prios = [prio for layers in self.prefill for out in layers.values() for prio in out.values()]
        return {"starts": np.array(list(self.index_of), dtype=np.int64),
                "indices": np.array(list(self.index_of.values()), dtype=np.int64),
                "experts": self.expert_array, "prios": self.prio_array,
                "prefills": np.array(len(self.prefill)),
                "prefill_keys": np.array(rows, dtype=np.int64).reshape(len(rows), 4),
                "prefill_prios": np.array(prios, dtype=np.float64)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> _Predictions:
        prefill: list[dict[int, dict[ExpertKey, float]]] = [{} for _ in range(int(a["prefills"]))]
        for (i, layer, target, e), prio in zip(a["prefill_keys"].tolist(), a["prefill_prios"].tolist(), strict=True):
            prefill[i].setdefault(layer, {})[(target, e)] = prio
        return cls(dict(zip(a["starts"].tolist(), a["indices"].tolist(), strict=True)),
                   np.asarray(a["experts"], np.int64), np.asarray(a["prios"], np.float64), prefill)


def _models_to_arrays(value: tuple[dict, float]) -> dict[str, np.ndarray]:
    models, took = value
    out = {"layers": np.array(sorted(models), dtype=np.int64), "took": np.array(took)}
    for layer, (w, b) in models.items():
        out[f"w{layer}"], out[f"b{layer}"] = w, b
    return out


def _models_from_arrays(a: dict[str, np.ndarray]) -> tuple[dict, float]:
    return {layer: (a[f"w{layer}"], a[f"b{layer}"]) for layer in a["layers"].tolist()}, float(a["took"])


# Trained predictors, by what they were trained on; their outputs on the measured iterations.
_MODELS: ContentMemo[tuple[dict, float]] = ContentMemo(8, "promoe-models", _models_to_arrays, _models_from_arrays)
_PREDICTIONS: ContentMemo[_Predictions] = ContentMemo(2, "promoe-predictions", _Predictions.to_arrays,
                                                      _Predictions.from_arrays)


@register
class ProMoE(TrackedCachePolicy):
    name = "promoe"
    uses_history = True

    def __init__(
        self,
        distance: int = 3,
        window: int = 2,
        epochs: int = 150,
        lr: float = 0.05,
        l2: float = 1e-4,
        max_train_tokens: int = 8192,
        retrain_every: int = 4,
        inputs: str = "auto",
    ) -> None:
        super().__init__()
        if int(distance) < 1 or int(window) < 1 or int(epochs) < 1 or int(max_train_tokens) < 1:
            raise TypeError("distance, window, epochs and max_train_tokens must be at least 1")
        if inputs not in ("auto", "probs", "topk"):
            raise TypeError(f"inputs must be auto, probs or topk, got {inputs!r}")
        self.distance, self.window, self.epochs = int(distance), int(window), int(epochs)
        self.lr, self.l2, self.max_train_tokens = float(lr), float(l2), int(max_train_tokens)
        self.retrain_every, self.inputs = int(retrain_every), inputs
        self.params = dict(
            distance=self.distance, window=self.window, epochs=self.epochs, lr=self.lr, l2=self.l2,
            max_train_tokens=self.max_train_tokens, retrain_every=self.retrain_every, inputs=self.inputs,
        )
        self.models: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # source layer -> (W, b)
        self.train_s = 0.0
        self.train_tokens = 0
        self.trainings = 0
        self.inputs_used: str | None = None
        self._seen: list[np.ndarray] = []  # rows of finished requests, for online retraining
        self._fitted = False
        self.predictions_planned = 0  # sequence-layers whose predictions `prepare` computed
        self._models_key = ""  # content hash of what the predictors were trained on
        self._planned: _Predictions | None = None  # every measured iteration's predictions (`prepare`)
        self._planned_trainings = -1  # `trainings` when they were computed
        self._seq_planned: list[int | None] = []  # per sequence of the step: its index in `_planned`

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        g = ctx.geometry
        self.L, self.J, self.K = g.num_layers, g.num_experts, g.top_k
        self._step: StepInfo | None = None
        self._rows: list[np.ndarray] = []  # per sequence: observed rows [tokens, L, J] of this step

    def _maps(self, trace, rows: np.ndarray) -> np.ndarray:
        if self.inputs_used is None:
            has_probs = trace.router_probs is not None
            self.inputs_used = "probs" if (self.inputs == "probs" or (self.inputs == "auto" and has_probs)) else "topk"
        if self.inputs_used == "probs":
            if trace.router_probs is None:
                from finemoe.errors import MissingFieldError

                raise MissingFieldError("promoe with inputs=probs needs trace field router_probs")
            return np.nan_to_num(trace.router_probs[rows].astype(np.float32))
        return topk_map(trace.experts[rows], trace.weights[rows], self.J)

    def _features(self, maps: np.ndarray, layer: int) -> np.ndarray:
        """[n, window * J]: rows of layers layer-window+1..layer (zeros before layer 0)."""
        n = maps.shape[0]
        if layer + 1 >= self.window:  # the window's rows lie side by side in each token's map
            return maps[:, layer + 1 - self.window : layer + 1].reshape(n, -1).astype(np.float64)
        parts = []
        for src in range(layer - self.window + 1, layer + 1):
            parts.append(maps[:, src] if src >= 0 else np.zeros((n, self.J), np.float32))
        return np.concatenate(parts, axis=1).astype(np.float64)

    def _train(self, trace, rows: np.ndarray) -> None:
        """Train the predictors on `rows` of `trace`, or take those trained on the same rows with
        the same parameters and seed earlier in this process (a sweep's other budgets):
        `train_s` is what their training took."""
        seed = self.ctx.seed if self.ctx else 0
        if rows.size > self.max_train_tokens:
            rng = np.random.default_rng(seed)
            rows = np.sort(rng.choice(rows, self.max_train_tokens, replace=False))
        maps = self._maps(trace, rows)
        experts = trace.experts[rows]
        key = digest(maps, experts, self.L, self.distance, self.window, self.epochs, self.lr, self.l2, seed)
        self.models, took = _MODELS.get(key, lambda: self._trained(maps, experts, seed))
        self._models_key = key
        self.train_s += took
        self.train_tokens = int(rows.size)
        self.trainings += 1

    def _trained(self, maps: np.ndarray, experts: np.ndarray, seed: int) -> tuple[dict, float]:
        """(source layer -> (W, b), seconds the training took)."""
        t0 = time.perf_counter()
        n = maps.shape[0]
        models = {}
        for layer in range(self.L - self.distance):
            target = layer + self.distance
            y = np.zeros((n, self.J))
            ids = experts[:, target]
            valid = ids >= 0
            r = np.broadcast_to(np.arange(n)[:, None], ids.shape)
            y[r[valid], ids[valid].astype(np.int64)] = 1.0
            keep = valid.any(axis=1) & (maps[:, layer].sum(axis=1) > 0)
            if not keep.any():
                continue
            x = self._features(maps[keep], layer)
            models[layer] = train_logistic(x, y[keep], epochs=self.epochs, lr=self.lr, l2=self.l2, seed=seed + layer)
        return models, time.perf_counter() - t0

    def fit(self, history) -> None:
        if history.num_tokens:
            self._train(history, np.arange(history.num_tokens))
            self._fitted = True

    def on_request_finished(self, request_id: int, trace) -> None:
        if self._fitted or self.retrain_every <= 0:
            return  # offline: the predictor is trained once, on the history split
        # Online mode (no history): retrain on every request finished so far, every few requests.
        self._seen.append(np.flatnonzero(trace.request_id == request_id))
        if len(self._seen) % self.retrain_every == 0:
            self._train(trace, np.concatenate(self._seen))

    def prepare(self, trace, measure: list[int]) -> None:
        """Every measured iteration's predictions, computed at once: the predictors are fixed for
        an offline run and read only the iteration's own rows (`_predictions_for`)."""
        if not self.models:
            return
        its = [it for rid in measure for it in trace.iterations_by_request.get(rid, ())]
        self._planned = _PREDICTIONS.get(
            digest(self._models_key, self.inputs_used, self.K, trace.content_hash(),
                   trace.router_probs if self.inputs_used == "probs" else None,
                   np.array([(it.start, it.stop) for it in its])),
            lambda: self._predictions_for(trace, its))
        self._planned_trainings = self.trainings

    def _predictions_for(self, trace, its) -> _Predictions:
        """What `on_layer_routed` computes per sequence, for the iterations `its`, bit for bit: a
        decode token's features times W as a [1, F] x [F, J] product, stacked (numpy's matmul runs
        each as that call does; one [n, F] product would sum in another order), a prefill's as
        its [tokens, F] call; then the K likeliest per token, ties to the lower id."""
        decode = [it for it in its if it.stop - it.start == 1]
        prefill = [it for it in its if it.stop - it.start > 1]
        index_of = {it.start: i for i, it in enumerate(decode)}
        index_of.update({it.start: -1 - i for i, it in enumerate(prefill)})
        maps = self._maps(trace, np.array([it.start for it in decode], dtype=np.int64))
        experts = np.full((len(decode), self.L, self.K), -1, dtype=np.int64)
        prios = np.zeros((len(decode), self.L, self.K))
        merged: list[dict[int, dict[ExpertKey, float]]] = [{} for _ in prefill]
        for layer, (w, b) in self.models.items():
            if decode:
                prob = _sigmoid((self._features(maps, layer)[:, None, :] @ w)[:, 0] + b)
                top = np.argsort(-prob, axis=1, kind="stable")[:, : self.K]
                experts[:, layer] = top
                prios[:, layer] = np.take_along_axis(prob, top, axis=1) / self.distance
            for out, it in zip(merged, prefill, strict=True):
                rows = self._maps(trace, np.arange(it.start, it.stop))
                prob = _sigmoid(self._features(rows, layer) @ w + b)
                out[layer] = self._ranked(prob, layer + self.distance, {})
        return _Predictions(index_of, experts, prios, merged)

    def _ranked(self, prob: np.ndarray, target: int, out: dict[ExpertKey, float]) -> dict[ExpertKey, float]:
        """Add each token's K likeliest experts of `prob` [tokens, J] to `out` (highest priority)."""
        for p in prob.tolist():
            # The K likeliest, ties to the lower id (as a stable argsort of -p).
            for e in sorted(range(len(p)), key=p.__getitem__, reverse=True)[: self.K]:
                prio = p[e] / self.distance
                if (target, e) not in out or out[(target, e)] < prio:
                    out[(target, e)] = prio
        return out

    def on_step_start(self, step: StepInfo) -> Iterable[Prefetch]:
        self._step = step
        planned = self._planned if self.trainings == self._planned_trainings else None
        self._seq_planned = [None if planned is None else planned.index_of.get(s.start) for s in step.sequences]
        self._rows = [None if i is not None else np.zeros((s.num_tokens, self.L, self.J), np.float32)
                      for i, s in zip(self._seq_planned, step.sequences, strict=True)]
        return []

    def on_layer_routed(self, routing: LayerRouting) -> Iterable[Prefetch]:
        layer = routing.layer
        model = self.models.get(layer)
        out: dict[ExpertKey, float] = {}  # (target, expert) -> highest priority among the tokens
        target = layer + self.distance
        for i in range(len(routing.step.sequences)):
            index = self._seq_planned[i] if i < len(self._seq_planned) else None
            if index is not None:  # `prepare`'s
                if model is not None:
                    self._merge_planned(out, index, layer, target)
                    self.predictions_planned += 1
                continue
            if i >= len(self._rows):
                break
            if self.inputs_used == "topk" or self.inputs_used is None:
                rows = topk_map(routing.experts(i), routing.weights(i), self.J)
            else:
                rows = routing.router_rows(i)
            self._rows[i][:, layer] = rows
            if model is None:
                continue
            w, b = model
            self._ranked(_sigmoid(self._features(self._rows[i], layer) @ w + b), target, out)  # [tokens, J]
        return ranked_prefetches(routing.step.step, out)

    def _merge_planned(self, out: dict[ExpertKey, float], index: int, layer: int, target: int) -> None:
        planned = self._planned
        if index >= 0:  # a decode token: its K experts
            pairs = zip(planned.expert_array[index, layer].tolist(), planned.prio_array[index, layer].tolist(),
                        strict=True)
        else:
            pairs = ((e, prio) for (_, e), prio in planned.prefill[-1 - index][layer].items())
        for e, prio in pairs:
            if (target, e) not in out or out[(target, e)] < prio:
                out[(target, e)] = prio

    def plans_asks(self) -> bool:
        """Whether `planned_asks` can stand for the hooks: the run's predictions were computed by
        `prepare` for the predictors in use (an offline run), or there are no predictors."""
        return not self.models or (self._planned is not None and self.trainings == self._planned_trainings)

    def planned_asks(self, trace, steps, first_step: int) -> PlannedAsks:
        """The hooks' asks for planned steps (`steps[s]` is engine step first_step + s): a decode
        step of one sequence reads `prepare`'s K experts per predicted layer, ranked as
        `ranked_prefetches` ranks them, all such steps at once; any other step calls the hooks."""
        planned, L, K = self._planned, self.L, self.K
        b = AskBuilder(len(steps), L, first_step)
        single, index = [], []
        for s, seqs in enumerate(steps):
            i = planned.index_of.get(seqs[0].start) if len(seqs) == 1 and planned is not None else None
            if i is not None and i >= 0:
                single.append(s)
                index.append(i)
        chosen = set(single)
        hook_asks(self, trace, steps, first_step, b, [s for s in range(len(steps)) if s not in chosen])
        layers = np.array(sorted(self.models), np.int64)
        if single and layers.size:
            experts = planned.expert_array[np.array(index)][:, layers]  # [m, layers, K]
            prios = planned.prio_array[np.array(index)][:, layers]
            order = np.lexsort((-experts, -prios), axis=-1)  # priority, then expert, descending
            experts = np.take_along_axis(experts, order, axis=-1)
            prios = np.take_along_axis(prios, order, axis=-1)
            at = b.append(np.broadcast_to((layers + self.distance)[None, :, None], experts.shape).ravel(),
                          experts.ravel(), prios.ravel())
            m, n = len(single), layers.size
            lo = at + (np.arange(m)[:, None] * n + np.arange(n)[None, :]) * K
            rows = np.array(single)[:, None]
            b.lo[rows, layers[None, :] + 1] = lo
            b.hi[rows, layers[None, :] + 1] = lo + K
            self.predictions_planned += m * n
        return b.build(wants_step=True)

    def describe(self) -> dict:
        d = super().describe()
        d["stats"] = {
            "train_s": round(self.train_s, 4),
            "train_tokens": self.train_tokens,
            "trainings": self.trainings,
            "predictors": len(self.models),
            "inputs_used": self.inputs_used,
            "predictions_planned": self.predictions_planned,
        }
        return d
