"""Common ground of the policies that compute missed experts on the CPU (docs/cpu-execution.md):
a static GPU placement made when the model loads, scratch slots for experts copied to be computed
on the GPU, and the rule runtimes use to move a large batch's experts to the GPU.

The static placement is loaded before the first step (`initial_residents`): llama.cpp, ktransformers
and Fiddler place their weights when the model loads, so this is their start state, not a warm
start the copy-on-miss policies are denied. It is never evicted while a scratch slot can be used; a copy into scratch is freed after its layer.
"""

from __future__ import annotations

from collections.abc import Callable

from finemoe.policies.base import COPY_ONCE, CPU, ExpertKey, PolicyContext, Prefetch
from finemoe.policies.caches import TrackedCachePolicy

# llama.cpp copies the weights of an operation to the GPU once a batch has at least 32 tokens
# (ggml-cuda's offload threshold); ik_llama.cpp PR #520 scales it for MoE layers by the experts
# per token: a batch of at least 32 x experts / top-k tokens, so that each expert sees ~32 tokens.
LLAMA_CPP_MIN_BATCH = 32


def offload_threshold(rule, num_experts: int, top_k: int) -> int | None:
    """The batch size (tokens) from which a layer's experts are copied and computed on the GPU;
    None: never. `rule`: "off", "llama.cpp", "ik_llama.cpp" or a number of tokens."""
    if rule in (None, "off", False):
        return None
    if rule == "llama.cpp":
        return LLAMA_CPP_MIN_BATCH
    if rule == "ik_llama.cpp":
        return -(-LLAMA_CPP_MIN_BATCH * num_experts // top_k)
    if isinstance(rule, bool) or not isinstance(rule, int) or rule < 1:
        raise TypeError(f"offload_batch is off, llama.cpp, ik_llama.cpp or a whole number of tokens, got {rule!r}")
    return rule


class CpuExecutingPolicy(TrackedCachePolicy):
    """A static GPU placement (`self.static`, set at bind or fit), every other expert computed on the
    CPU (`place`), and with `offload_batch` a batch that large copied to the GPU instead. Copies go to
    `scratch_slots()` slots kept out of the placement, freed once their layer is done (`COPY_ONCE`);
    what else the slots hold is evicted in `cache_order` (LRU unless a subclass says otherwise)."""

    executes_on_cpu = True

    def __init__(self, offload_batch="off", **params) -> None:
        super().__init__(**params)
        offload_threshold(offload_batch, 8, 2)  # the value's type is checked now, its tokens at bind
        self.offload_batch = offload_batch
        self.params = {"offload_batch": offload_batch}

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        g = ctx.geometry
        self.threshold = offload_threshold(self.offload_batch, g.num_experts, g.top_k)
        self.static: list[ExpertKey] = []
        self._placed: set[ExpertKey] = set()  # `static` as loaded (`initial_residents`): evicted last

    def scratch_slots(self) -> int:
        """Slots left out of the static placement for copies: a whole layer's experts when large
        batches are offloaded (llama.cpp sizes its compute buffer for one layer's expert tensors)."""
        return self.ctx.geometry.num_experts if self.threshold is not None else 0

    def placement_slots(self) -> int:
        return max(0, self.ctx.capacity_slots - self.scratch_slots())

    def initial_residents(self) -> list[ExpertKey]:
        """The placement, loaded before the first step (after `fit`, which may choose it)."""
        placed = self.static[: self.placement_slots()]
        self._placed = set(placed)
        return list(placed)

    def place(self, layer: int, expert: int, tokens: int) -> str:
        """Where a missed expert runs when the batch is not offloaded: on the CPU by default."""
        return CPU

    def place_misses(self, layer, misses, tokens, step_tokens, now_s) -> dict[int, str]:
        if self.threshold is not None and step_tokens >= self.threshold:
            return dict.fromkeys(misses, COPY_ONCE)
        return {e: self.place(layer, e, n) for e, n in zip(misses, tokens, strict=True)}

    def choose_victim(self, evictable: Callable[[ExpertKey], bool], for_prefetch: Prefetch | None,
                      now_s: float) -> ExpertKey | None:
        placed = self._placed
        victim = self._cache.victim(lambda key: key not in placed and evictable(key))
        if victim is None and for_prefetch is None:
            victim = self._cache.victim(evictable)  # only when every copied expert is still needed
        return victim
