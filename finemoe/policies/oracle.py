"""The oracle: Belady (MIN) eviction with perfect prefetch under the same link. A bound, not a policy
a server could run: it reads the future from the engine's OracleView (exact with all-at-once
arrivals; with later arrivals it sees admitted and queued requests only, see docs/timing-model.md).

Prefetch: at each step start and each routed layer it asks for every expert used within the next
`lookahead_layers` layers that is not resident or on the wire, nearest use first. Eviction: the
evictable resident expert whose next use is farthest away; a prefetch is refused (dropped) rather
than evict an expert needed no later than the one it would bring in.
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
        here = step * self.L + layer
        limit = here + self.lookahead
        resident, in_flight = self.ctx.is_resident, self.ctx.is_in_flight
        out = []
        for s, lay, e in self.view.upcoming(self.pos, self.lookahead * self.J):
            p = s * self.L + lay
            if p > limit:
                break
            key = (lay, e)
            if not resident(key) and not in_flight(key):
                out.append(Prefetch(float(-p), s, lay, e))
        return out

    # --- notifications -------------------------------------------------------------------------------
    def on_step_start(self, step):
        self.pos = (step.step, -1)
        return self._prefetches()

    def on_layer_routed(self, routing):
        self.pos = (routing.step.step, routing.layer)
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
        return victim
