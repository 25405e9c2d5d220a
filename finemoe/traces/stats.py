"""Routing statistics of a trace: how balanced, how predictable. Pure functions of a Trace.

Definitions (all entropies in bits, records absent from the source are left out everywhere):

- usage entropy of layer l: entropy of the distribution of expert selections at layer l, every
  top-k slot of every token counting once. log2(J) means perfectly balanced use.
- routing distribution pi(t, l) of token t at layer l: the full router softmax when the trace has
  `router_probs`; otherwise its top-k gate weights renormalised to sum 1 (zero elsewhere), so the
  statistic is computable from imported logs that only kept the top-k. The top-k form drops the
  tail, so it reads lower than the full form would.
- fine (per-iteration) entropy: for every iteration i and layer l, the entropy of the mean of
  pi(t, l) over the tokens t of that iteration; averaged over all (iteration, layer). A decode
  iteration holds one token, a prefill all prompt tokens. This is how concentrated routing is at
  the moment a prefetcher must act (FineMoE's "fine-grained").
- coarse (per-request) entropy: the same with the mean taken over all tokens of a request, all its
  iterations; averaged over all (request, layer). This is what a request-level activation matrix
  (MoE-Infinity style, FineMoE's "coarse-grained") sees.
- cross-layer predictability: H(top-1 at l+1 | top-1 at l), the plug-in estimate from the joint
  counts of adjacent layers' top-1 experts, next to H(top-1 at l+1) alone; their difference is the
  information layer l's choice carries about layer l+1's. Plug-in estimates read low when tokens
  are few next to J^2 cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finemoe.traces.schema import MISSING_EXPERT, Trace

_CHUNK = 4096  # rows per block when densifying router probabilities


def entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Entropy of (unnormalised, non-negative) distributions along `axis`; 0 for an all-zero row."""
    p = np.asarray(p)
    p = p.astype(np.float64 if p.dtype != np.float32 else np.float32, copy=False)
    total = p.sum(axis=axis, keepdims=True)
    q = np.divide(p, total, out=np.zeros_like(p), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, -q * np.log2(q), 0.0)
    return terms.sum(axis=axis, dtype=np.float64)


@dataclass
class RoutingStats:
    tokens_used: int
    source: str  # "router_probs" or "top-k weights"
    max_entropy_bits: float
    usage_entropy_bits: np.ndarray  # [L]
    fine_entropy_bits: float
    coarse_entropy_bits: float
    fine_entropy_per_layer_bits: np.ndarray  # [L]
    coarse_entropy_per_layer_bits: np.ndarray  # [L]
    next_top1_entropy_bits: np.ndarray  # [L-1]: H(top-1 at l+1)
    next_top1_cond_entropy_bits: np.ndarray  # [L-1]: H(top-1 at l+1 | top-1 at l)
    top1_weight_share: float  # mean share of the top-1 expert in the renormalised top-k weight

    def to_dict(self) -> dict:
        """Plain JSON: NaN (nothing to measure, e.g. no tokens) becomes null."""

        def num(x):
            x = float(x)
            return None if np.isnan(x) else round(x, 4)

        def r(a):
            return [num(x) for x in a]

        return {
            "tokens_used": self.tokens_used,
            "source": self.source,
            "max_entropy_bits": num(self.max_entropy_bits),
            "usage_entropy_bits": {
                "mean": num(_mean(self.usage_entropy_bits)),
                "min": num(self.usage_entropy_bits.min()) if self.usage_entropy_bits.size else None,
                "max": num(self.usage_entropy_bits.max()) if self.usage_entropy_bits.size else None,
                "per_layer": r(self.usage_entropy_bits),
            },
            "fine_entropy_bits": num(self.fine_entropy_bits),
            "coarse_entropy_bits": num(self.coarse_entropy_bits),
            "fine_entropy_per_layer_bits": r(self.fine_entropy_per_layer_bits),
            "coarse_entropy_per_layer_bits": r(self.coarse_entropy_per_layer_bits),
            "next_top1_entropy_bits": num(_mean(self.next_top1_entropy_bits)),
            "next_top1_cond_entropy_bits": num(_mean(self.next_top1_cond_entropy_bits)),
            "next_top1_cond_entropy_per_layer_bits": r(self.next_top1_cond_entropy_bits),
            "top1_weight_share": num(self.top1_weight_share),
        }


def _mean(a: np.ndarray) -> float:
    """Mean over what could be measured (NaN entries left out); NaN if nothing could."""
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def usage_entropy(trace: Trace, rows: np.ndarray | None = None) -> np.ndarray:
    """[L] entropy of expert selection counts per layer."""
    g = trace.geometry
    L, J = g.num_layers, g.num_experts
    counts = np.zeros((L, J))
    for layer in range(L):  # one layer at a time: no [n, L, K] temporaries
        ids = trace.experts[:, layer, :] if rows is None else trace.experts[rows, layer, :]
        counts[layer] = np.bincount(ids.reshape(-1).astype(np.intp) + 1, minlength=J + 1)[1:]  # -1 -> bin 0
    h = entropy_bits(counts, axis=1)
    h[counts.sum(axis=1) == 0] = np.nan  # no record at that layer: nothing to measure
    return h


def _groups(keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Starts and stops of runs of equal consecutive key tuples (rows are sorted)."""
    n = keys[0].shape[0]
    change = np.zeros(max(n - 1, 0), bool)
    for k in keys:
        change |= np.diff(k) != 0
    starts = np.concatenate(([0], np.flatnonzero(change) + 1))
    stops = np.concatenate((starts[1:], [n]))
    return starts, stops


def _dist_sum(trace: Trace, rows: np.ndarray, use_probs: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sum over `rows` of pi(t, l) as [L, J], and how many rows had layer l present ([L])."""
    g = trace.geometry
    L, J = g.num_layers, g.num_experts
    ex = trace.experts[rows]
    present = ex[:, :, 0] != MISSING_EXPERT
    if use_probs:
        total = np.zeros((L, J))
        for a in range(0, rows.size, _CHUNK):
            p = trace.router_probs[rows[a:a + _CHUNK]].astype(np.float32)
            p = p * present[a:a + _CHUNK, :, None]
            s = p.sum(axis=2, keepdims=True)
            total += np.divide(p, s, out=np.zeros_like(p), where=s > 0).sum(axis=0)
        return total, present.sum(axis=0)
    w = trace.weights[rows].astype(np.float64)
    s = w.sum(axis=2, keepdims=True)
    w = np.divide(w, s, out=np.zeros_like(w), where=s > 0)
    ok = ex != MISSING_EXPERT
    layer = np.broadcast_to(np.arange(L)[None, :, None], ex.shape)
    total = np.bincount(layer[ok].astype(np.int64) * J + ex[ok], weights=w[ok], minlength=L * J)
    return total.reshape(L, J), present.sum(axis=0)


def _single_token_entropy(trace: Trace, rows: np.ndarray, use_probs: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sum over `rows` of H(pi(t, l)) per layer, and the present counts, block by block."""
    L = trace.geometry.num_layers
    total = np.zeros(L)
    count = np.zeros(L, np.int64)
    for a in range(0, rows.size, _CHUNK):
        r = rows[a:a + _CHUNK]
        present = trace.experts[r, :, 0] != MISSING_EXPERT
        src = trace.router_probs[r] if use_probs else trace.weights[r]
        h = entropy_bits(src.astype(np.float32), axis=2)
        total += np.where(present, h, 0.0).sum(axis=0)
        count += present.sum(axis=0)
    return total, count


def _top1_share(trace: Trace, rows: np.ndarray) -> float:
    """Mean share of the top-1 expert in the top-k weight over present records, block by block."""
    total, count = 0.0, 0
    for a in range(0, rows.size, _CHUNK):
        w = trace.weights[rows[a:a + _CHUNK]].astype(np.float32)
        s = w.sum(axis=2)
        ok = s > 0
        total += float((w[:, :, 0][ok] / s[ok]).sum(dtype=np.float64))
        count += int(ok.sum())
    return total / count if count else float("nan")


def routing_stats(trace: Trace, *, decode_only: bool = False) -> RoutingStats:
    """Every statistic of the module docstring, over all tokens or only decode iterations."""
    g = trace.geometry
    L, J = g.num_layers, g.num_experts
    use_probs = trace.router_probs is not None
    sel = np.flatnonzero(trace.iteration > 0) if decode_only else np.arange(trace.num_tokens)
    top1 = trace.experts[sel, :, 0]  # [n, L]
    present = top1 != MISSING_EXPERT

    usage = usage_entropy(trace, sel)

    # fine: per (request, iteration); coarse: per request
    rid, it = trace.request_id[sel], trace.iteration[sel]
    fine_sum, fine_n = np.zeros(L), np.zeros(L, np.int64)
    coarse_sum, coarse_n = np.zeros(L), np.zeros(L, np.int64)
    if sel.size:
        starts, stops = _groups([rid, it])
        single = (stops - starts) == 1
        h, c = _single_token_entropy(trace, sel[starts[single]], use_probs)
        fine_sum += h
        fine_n += c
        for a, b in zip(starts[~single], stops[~single], strict=True):
            dist, n_present = _dist_sum(trace, sel[a:b], use_probs)
            has = n_present > 0
            fine_sum += np.where(has, entropy_bits(dist, axis=1), 0.0)
            fine_n += has
        r_starts, r_stops = _groups([rid])
        for a, b in zip(r_starts, r_stops, strict=True):
            dist, n_present = _dist_sum(trace, sel[a:b], use_probs)
            has = n_present > 0
            coarse_sum += np.where(has, entropy_bits(dist, axis=1), 0.0)
            coarse_n += has
    fine_layer = np.divide(fine_sum, fine_n, out=np.full(L, np.nan), where=fine_n > 0)
    coarse_layer = np.divide(coarse_sum, coarse_n, out=np.full(L, np.nan), where=coarse_n > 0)

    # cross-layer: joint counts of (top-1 at l, top-1 at l+1) for every adjacent pair
    cond = np.full(max(L - 1, 0), np.nan)
    marg = np.full(max(L - 1, 0), np.nan)
    if L > 1 and sel.size:
        joint = np.zeros((L - 1, J * J))
        for layer in range(L - 1):
            both = present[:, layer] & present[:, layer + 1]
            pair = top1[both, layer].astype(np.intp) * J + top1[both, layer + 1]
            joint[layer] = np.bincount(pair, minlength=J * J)
        h_joint = entropy_bits(joint, axis=1)
        h_prev = entropy_bits(joint.reshape(L - 1, J, J).sum(axis=2), axis=1)
        cond = h_joint - h_prev
        marg = entropy_bits(joint.reshape(L - 1, J, J).sum(axis=1), axis=1)
        empty = joint.sum(axis=1) == 0  # no token has both layers: nothing to measure
        cond[empty] = np.nan
        marg[empty] = np.nan

    top1_share = _top1_share(trace, sel)

    return RoutingStats(
        tokens_used=int(sel.size),
        source="router_probs" if use_probs else "top-k weights",
        max_entropy_bits=float(np.log2(J)),
        usage_entropy_bits=usage,
        fine_entropy_bits=_mean(fine_layer[~np.isnan(fine_layer)]),
        coarse_entropy_bits=_mean(coarse_layer[~np.isnan(coarse_layer)]),
        fine_entropy_per_layer_bits=fine_layer,
        coarse_entropy_per_layer_bits=coarse_layer,
        next_top1_entropy_bits=marg,
        next_top1_cond_entropy_bits=cond,
        top1_weight_share=top1_share,
    )


def summarize(trace: Trace) -> dict:
    """Counts a person checks first: requests, tokens, geometry, gaps, optional fields."""
    g = trace.geometry
    reqs = trace.requests
    logged = list(trace.logged_layers)  # a partial log's other layers are absent by design, not gaps
    missing = trace.missing_mask[:, logged]
    per_token = missing.sum(axis=1)
    src = (trace.metadata or {}).get("source", {}) if isinstance(trace.metadata, dict) else {}
    unknown = set(src.get("prompt_tokens_unknown", []) or []) if isinstance(src, dict) else set()
    return {
        "requests": len(reqs),
        "requests_with_prefill": sum(r.has_prefill for r in reqs),
        "prompt_tokens": sum(r.prompt_tokens for r in reqs),
        "prompt_tokens_unknown_requests": len(unknown),
        "generated_tokens": sum(r.generated_tokens for r in reqs),
        "generated_tokens_per_request": [r.generated_tokens for r in reqs],
        "token_rows": trace.num_tokens,
        "iterations": len(_groups([trace.request_id, trace.iteration])[0]) if trace.num_tokens else 0,
        "geometry": g.to_dict(),
        "missing_records": int(missing.sum()),
        "tokens_with_missing_layers": int((per_token > 0).sum()),
        "tokens_missing_every_layer": int((per_token == len(logged)).sum()),
        "layers_logged": logged,
        "optional_fields": [
            name for name in ("router_probs", "semantic_key", "spec_experts", "spec_weights")
            if getattr(trace, name) is not None
        ],
        "source": src.get("kind", "") if isinstance(src, dict) else "",
    }
