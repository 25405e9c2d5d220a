"""The oracle: Belady (MIN) eviction with perfect prefetch under the same link. A bound, not a policy
a server could run: it reads the future from the engine's OracleView (exact with all-at-once
arrivals; with later arrivals it sees admitted and queued requests only, see docs/timing-model.md).

Prefetch: at each step start and each routed layer it asks for every expert used within the next
`lookahead_layers` layers that is not resident or on the wire, nearest use first. Eviction: the
evictable resident expert whose next use is farthest away. A prefetch that needs a victim is
refused (dropped) rather than evict an expert needed no later than the one it would bring in, or
when its copy, starting now, would land after it is needed (estimated with the shortest layer time
seen so far): on a saturated link a late prefetch is a miss anyway, and its victim might have hit.
Belady is optimal for demand paging; with prefetching under finite bandwidth no simple rule is, so
this is a strong reference rather than a proof (the property tests check it against every policy).
"""

from __future__ import annotations

import heapq

from finemoe.errors import ConfigError
from finemoe.policies.base import Policy, Prefetch
from finemoe.policies.registry import register

INF = float("inf")


@register
class OraclePolicy(Policy):
    name = "oracle"
    is_oracle = True

    def __init__(self, lookahead_layers: int | None = None) -> None:
        super().__init__()
        if lookahead_layers is not None and lookahead_layers < 1:
            raise ConfigError(f"oracle lookahead_layers must be at least 1, got {lookahead_layers}")
        self.params = {"lookahead_layers": lookahead_layers}

    def bind(self, ctx) -> None:
        super().bind(ctx)
        if ctx.oracle is None:
            raise ConfigError("the oracle policy needs an engine that provides a view of the future")
        self.view = ctx.oracle
        g = ctx.geometry
        self.L, self.J = g.num_layers, g.num_experts
        self.lookahead = self.params["lookahead_layers"] or self.L
        self.pos = (0, -1)
        self.resident: set = set()
        self.next_use: dict = {}
        self._heap: list = []
        self._version = -1
        self._last_routed: tuple[int, float] | None = None  # (position, now_s)
        self.layer_s: float | None = None  # shortest interval seen between consecutive routed layers

    def describe(self) -> dict:
        d = super().describe()
        d["bound"] = "upper bound on hit rate: Belady eviction with perfect prefetch"
        return d

    # --- the future --------------------------------------------------------------------------------
    def _refresh(self) -> None:
        if self.view.version != self._version:
            self._version = self.view.version
            self._heap = []
            for key in self.resident:
                self._set_next(key)

    def _set_next(self, key) -> None:
        nu = self.view.next_use(key, self.pos)
        self.next_use[key] = nu
        heapq.heappush(self._heap, (-nu, key))

    def initial_residents(self):
        out, seen = [], set()
        cap = self.ctx.capacity_slots
        for _, layer, e in self.view.upcoming((0, -1), cap * self.L * 4):
            if (layer, e) not in seen:
                seen.add((layer, e))
                out.append((layer, e))
                if len(out) >= cap:
                    break
        return out

    def _prefetches(self) -> list[Prefetch]:
        self._refresh()
        step, layer = self.pos
        L = self.L
        limit = step * L + layer + self.lookahead
        resident, in_flight = self.resident, self.ctx.is_in_flight
        out = []
        for s, lay, e in self.view.upcoming(self.pos, self.lookahead * self.J):
            p = s * L + lay
            if p > limit:
                break
            if (lay, e) not in resident and not in_flight((lay, e)):
                out.append(Prefetch(float(-p), s, lay, e))
        return out

    # --- notifications -------------------------------------------------------------------------------
    def on_step_start(self, step):
        self.pos = (step.step, -1)
        return self._prefetches()

    def on_layer_routed(self, routing):
        self.pos = (routing.step.step, routing.layer)
        here = self.pos[0] * self.L + self.pos[1]
        if self._last_routed is not None and self._last_routed[0] == here - 1:
            dt = routing.now_s - self._last_routed[1]
            self.layer_s = dt if self.layer_s is None else min(self.layer_s, dt)
        self._last_routed = (here, routing.now_s)
        return self._prefetches()

    def on_access(self, layer, expert, hit, now_s) -> None:
        key = (layer, expert)
        if key in self.resident:
            self._set_next(key)

    def on_loaded(self, key, now_s) -> None:
        self.resident.add(key)
        self._set_next(key)

    def on_evicted(self, key, now_s) -> None:
        self.resident.discard(key)
        self.next_use.pop(key, None)

    def choose_victim(self, evictable, for_prefetch, now_s):
        self._refresh()
        heap, aside, victim = self._heap, [], None
        while heap:
            neg, key = heap[0]
            if self.next_use.get(key) != -neg or key not in self.resident:
                heapq.heappop(heap)  # stale entry
                continue
            if evictable(key):
                victim = key
                break
            aside.append(heapq.heappop(heap))
        for item in aside:
            heapq.heappush(heap, item)
        if victim is None:
            return None
        if for_prefetch is not None:
            wanted = self.view.next_use(for_prefetch.key, self.pos)
            if self.next_use[victim] <= wanted:
                return None
            here = self.pos[0] * self.L + self.pos[1]
            layers_ahead = for_prefetch.step * self.L + for_prefetch.layer - here
            time_left = layers_ahead * (self.layer_s or 0.0)
            if self.ctx.expert_load_s > time_left:
                return None
        return victim
