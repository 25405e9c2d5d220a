"""The metrics recorder: engines only append to it (counts, request timestamps, timeline events);
`to_result` turns it into a RunResult at the end. Engine-neutral: times are seconds."""

from __future__ import annotations

from dataclasses import dataclass, field

from finemoe.results import TIMELINE_FIELDS, RunResult, latency_stats, request_times


@dataclass
class MetricsRecorder:
    num_layers: int
    timeline_steps: int = 8
    hits: list[int] = field(init=False)
    misses: list[int] = field(init=False)
    ondemand_loads: int = 0
    stall_s: float = 0.0
    bytes_h2d: int = 0  # expert weights copied to the GPU
    # Experts computed on the CPU (docs/cpu-execution.md) and the activations that cross for them.
    cpu_experts: int = 0
    cpu_busy_s: float = 0.0
    cpu_wait_s: float = 0.0  # the GPU waiting for the CPU's result
    bytes_d2h: int = 0  # hidden states to the CPU
    bytes_h2d_activations: int = 0  # the CPU's expert outputs back to the GPU
    # The SSD tier behind host memory (sim/storage.py): copies that found their expert in host RAM,
    # reads from the SSD, and their bytes.
    # Copies at a policy's low precision (HOBBIT), and low copies reloaded in full for an important use.
    low_loads: int = 0
    low_upgrades: int = 0
    host_hits: int = 0
    ssd_reads: int = 0
    bytes_ssd: int = 0
    prefetch_issued: int = 0  # accepted into the queue (not resident, in flight or queued already)
    prefetch_started: int = 0  # copies begun
    prefetch_in_time: int = 0  # resident when first needed after being prefetched
    prefetch_late: int = 0  # needed while still in flight or still queued
    prefetch_unused_evicted: int = 0  # evicted before any use
    prefetch_dropped: int = 0  # left the queue without a copy (target passed, or no victim allowed)
    layer_steps: int = 0  # sum over engine steps of layers x sequences
    steps: int = 0
    tokens: int = 0  # tokens processed (prompt tokens of prefills + decode tokens)
    requests: dict[int, dict] = field(default_factory=dict)
    timeline: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hits = [0] * self.num_layers
        self.misses = [0] * self.num_layers

    # --- appenders -----------------------------------------------------------------------------
    def request_arrived(self, request_id: int, arrival_s: float, prompt_tokens: int, generated_tokens: int) -> None:
        self.requests[request_id] = {
            "request_id": request_id,
            "arrival_s": arrival_s,
            "first_token_s": float("nan"),
            "finish_s": float("nan"),
            "prompt_tokens": prompt_tokens,
            "generated_tokens": generated_tokens,
        }

    def first_token(self, request_id: int, t_s: float) -> None:
        self.requests[request_id]["first_token_s"] = t_s

    def finished(self, request_id: int, t_s: float) -> None:
        self.requests[request_id]["finish_s"] = t_s

    def event(self, lane: str, kind: str, step: int, layer: int, expert: int, start_s: float, end_s: float,
              miss: bool) -> None:
        if step < self.timeline_steps:
            self.timeline.append(dict(zip(TIMELINE_FIELDS, (lane, kind, step, layer, expert, start_s, end_s, miss),
                                          strict=True)))

    # --- results --------------------------------------------------------------------------------
    @property
    def total_hits(self) -> int:
        return sum(self.hits)

    @property
    def total_misses(self) -> int:
        return sum(self.misses)

    @property
    def hit_rate(self) -> float:
        n = self.total_hits + self.total_misses
        return self.total_hits / n if n else float("nan")

    def per_layer_hit_rate(self) -> list[float]:
        return [h / (h + m) if h + m else float("nan") for h, m in zip(self.hits, self.misses, strict=True)]

    def summary(self, wall_s: float, makespan_s: float) -> dict:
        rows = list(self.requests.values())  # in arrival order, as the latency figures have always been taken
        times = request_times(*([r[k] for r in rows] for k in ("arrival_s", "first_token_s", "finish_s",
                                                               "generated_tokens")))
        out = {
            "hit_rate": self.hit_rate,
            "hits": self.total_hits,
            "misses": self.total_misses,
            "ondemand_loads": self.ondemand_loads,
            "stall_s": self.stall_s,
            "bytes_h2d": self.bytes_h2d,
            # where each routed expert ran: resident on the GPU, on the GPU after its copy, on the CPU
            "ran_gpu_resident": self.total_hits,
            "ran_gpu_copied": self.total_misses - self.cpu_experts,
            "ran_cpu": self.cpu_experts,
            "cpu_busy_s": self.cpu_busy_s,
            "cpu_wait_s": self.cpu_wait_s,
            "bytes_d2h": self.bytes_d2h,
            "bytes_h2d_activations": self.bytes_h2d_activations,
            "low_loads": self.low_loads,
            "low_upgrades": self.low_upgrades,
            "host_hits": self.host_hits,
            "ssd_reads": self.ssd_reads,
            "bytes_ssd": self.bytes_ssd,
            "prefetch_issued": self.prefetch_issued,
            "prefetch_started": self.prefetch_started,
            "prefetch_in_time": self.prefetch_in_time,
            "prefetch_late": self.prefetch_late,
            "prefetch_unused_evicted": self.prefetch_unused_evicted,
            "prefetch_dropped": self.prefetch_dropped,
            "layer_steps": self.layer_steps,
            "steps": self.steps,
            "tokens": self.tokens,
            "requests": len(self.requests),
            "makespan_s": makespan_s,
            "wall_s": wall_s,
            "layer_steps_per_wall_s": self.layer_steps / wall_s if wall_s > 0 else float("nan"),
        }
        out.update(latency_stats(times))
        return out

    def to_result(self, config: dict, *, wall_s: float, makespan_s: float) -> RunResult:
        return RunResult(
            config=config,
            summary=self.summary(wall_s, makespan_s),
            requests=sorted(self.requests.values(), key=lambda r: r["request_id"]),  # (the frame's rows)
            per_layer_hit_rate=self.per_layer_hit_rate(),
            timeline=list(self.timeline),
        )
