"""Replay one configuration for real: the simulator's workload, batching, cache and policy objects,
driving real copies and real compute, timed by the clock instead of a cost model.

What is shared with the simulator (and therefore decides identically given the same timing): the
history/measure split, arrivals and continuous batching (`finemoe.sim.workload`), the expert cache
with its queues, drop rules and victim choice (`finemoe.sim.cache`), the metrics recorder
(`finemoe.sim.metrics`), the memory arithmetic (`finemoe.sim.memory`) and the policy objects. What
is this module's own: the weights in host memory, the device slot pool, the copy engines, the arithmetic,
and the clock.

One engine step, as the main thread runs it:
    on_step_start -> prefetches queued, copies started on idle copy engines
    per layer: dense matmuls + attention over the KV cache (real), then the routing becomes visible:
        on_layer_routed -> prefetches; each routed expert is accessed (hit / miss -> on-demand load);
        resident experts compute first, missing ones as their copies land (the wait is stall time)
    the step ends when the device has finished its work; first-token / finish times are taken there.
Copy engines are threads (finemoe.replay.engines) that take the next transfer from the cache as soon
as they are free, on-demand loads first: the simulator's link discipline. Cache and policy are
touched only under one lock, by the main thread between kernels and by the engines between copies.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from finemoe.errors import ConfigError
from finemoe.policies.base import LayerRouting, PolicyContext, Prefetch, StepInfo
from finemoe.policies.registry import make_policy
from finemoe.policies.support import check_support
from finemoe.replay.compute import (
    KEY_BUCKET,
    AttentionMasks,
    attend,
    dense_layer,
    expert_ffn,
    swiglu,
)
from finemoe.replay.cpu_worker import CpuJob, CpuWorker, job_spans
from finemoe.replay.device import check_device, cpu_threads, split_cores, synchronize, torch_threads
from finemoe.replay.engines import CopyEngines
from finemoe.replay.modelled import ModelledMachine
from finemoe.replay.slots import SlotPool
from finemoe.replay.weights import DenseWeights, HostExperts, check_host_memory, expert_shape
from finemoe.results import RunResult
from finemoe.sim.cache import ExpertCache
from finemoe.sim.config import SimConfig
from finemoe.sim.costs import TICKS_PER_S, CostModel
from finemoe.sim.cpu_side import CpuTimer, record_cpu_layer, split_misses
from finemoe.sim.memory import plan_memory
from finemoe.sim.metrics import MetricsRecorder
from finemoe.sim.run import cpu_for
from finemoe.sim.workload import arrival_times, build_batcher, split_requests
from finemoe.traces.schema import Trace


def needed_experts(trace: Trace, seqs, layer: int) -> tuple[tuple[int, int], ...]:
    """(expert, tokens) routed at `layer` in this step, in the simulator's access order: by expert id
    (a lone decode token's experts, or merged over the batch)."""
    if len(seqs) == 1 and seqs[0].num_tokens == 1:
        return tuple((e, 1) for e in sorted(trace.experts[seqs[0].start, layer].tolist()) if e >= 0)
    merged: dict[int, int] = {}
    for s in seqs:
        ids, counts = np.unique(trace.experts[s.start : s.stop, layer, :], return_counts=True)
        for e, c in zip(ids.tolist(), counts.tolist(), strict=True):
            if e >= 0:
                merged[e] = merged.get(e, 0) + c
    return tuple(sorted(merged.items()))


GIL_SWITCH_S = 0.0005
_S = 1.0 / TICKS_PER_S


@dataclass(frozen=True)
class ReplayOptions:
    """How to execute (not *what*: that is the SimConfig, shared with the simulator)."""

    device: str = "cpu"
    threads: int | None = None  # torch CPU threads; default cores - 1 on cpu
    weights_path: str | None = None  # real expert weights (the checkpoint the trace came from)
    expert_scale: float = 1.0  # recorded only: the caller scaled the trace's geometry
    warmup: bool = True  # run each kernel shape once before the clock starts
    # "measured": real copies and compute, timed by the clock. "modelled": the same step logic on a
    # virtual clock with the simulator's cost model for copies and compute (finemoe.replay.modelled),
    # so that the replayer's mechanics can be checked exactly against the simulator.
    timing: str = "measured"

    def to_dict(self) -> dict:
        return asdict(self)


def replay(trace: Trace, config: SimConfig, options: ReplayOptions | None = None,
           progress: Callable[[int, int], None] | None = None) -> RunResult:
    """Run `config` on `trace` with real copies and compute; a RunResult with `engine: "replay"`."""
    options = options or ReplayOptions()
    if options.timing not in ("measured", "modelled"):
        raise ConfigError(f"replay timing must be 'measured' or 'modelled', got {options.timing!r}")
    device = check_device(options.device)
    if options.timing == "modelled":  # nothing runs on the machine: no threads, no cores to split
        return _Replayer(trace, config, options, device, 1, progress).run()
    threads = options.threads if options.threads is not None else cpu_threads(device)
    # Copy engines are Python threads: a short GIL switch interval lets one start its copy within
    # ~0.5 ms while the main thread runs policy code, instead of Python's default 5 ms.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_S)
    try:
        with torch_threads(threads), split_cores(device, threads):
            return _Replayer(trace, config, options, device, threads, progress).run()
    finally:
        sys.setswitchinterval(switch)


class _Replayer:
    def __init__(self, trace: Trace, config: SimConfig, options: ReplayOptions, device: str, threads: int,
                 progress: Callable[[int, int], None] | None) -> None:
        import torch

        self.torch = torch
        self.trace, self.config, self.options, self.device, self.threads = trace, config, options, device, threads
        self.cuda = device.startswith("cuda")
        self.progress = progress
        g = self.geometry = trace.geometry
        w = config.workload

        self.policy = make_policy(config.policy, **config.policy_params)
        check_support(self.policy, trace)
        if self.policy.is_oracle:
            raise ConfigError(
                f"policy {self.policy.name} is an oracle (a bound that sees the future); replay runs "
                "realisable policies only, simulate it instead"
            )
        if self.policy.lossy:
            raise ConfigError(f"policy {self.policy.name} {self.policy.describe()['lossy']}: the replayer has no "
                              "low-precision expert kernels; simulate it instead")
        for what, value in (("--expert-dtype", config.expert_dtype), ("--host-mem", config.host_mem_bytes),
                            ("--layer-capacity", config.memory.layer_capacity)):
            if value is not None:
                raise ConfigError(f"replay does not run {what} yet; simulate it instead")
        self.split = split_requests(trace, w, config.seed)
        measured = [trace.request(r) for r in self.split.measure]
        longest = max((r.prompt_tokens + r.generated_tokens for r in measured), default=1)
        self.plan = plan_memory(g, config.hardware, config.memory, max_batch=w.max_batch,
                                longest_request_tokens=longest)
        self.costs = CostModel(config.hardware, g, cpu_for(config, self.policy))
        # Misses the policy computes on the CPU (docs/cpu-execution.md): a host thread runs them
        # (measured) or the simulator's CPU timing does (modelled).
        self.cpu_exec = bool(self.policy.executes_on_cpu)
        self.cpu_timer = CpuTimer(self.costs) if self.cpu_exec else None
        self.cpu_worker: CpuWorker | None = None
        self.cpu_pending: CpuJob | int | None = None  # this layer's CPU side (a job, or its modelled end tick)
        self.transient: list = []  # COPY_ONCE experts of this layer: their slots free after it
        self.rec = MetricsRecorder(g.num_layers, config.timeline_steps)
        self.cache = ExpertCache(self.plan.expert_cache_slots, self.policy, self.rec, g.bytes_per_expert)
        self.arrivals = arrival_times(len(self.split.measure), w, config.seed)

        self.modelled = options.timing == "modelled"
        base = threading.RLock()
        self.lock = threading.Condition(base)  # the main thread waits on it for copies to land
        self.work = threading.Condition(base)  # idle copy engines wait on it for transfers
        self.inline_copies = 0
        self.wakeup_s: list[float] = []  # stalled compute thread: copy landed -> it runs again
        self.policy_s = 0.0  # wall time inside the policy's step and layer calls, on the critical path
        self.cpu_wait_s = 0.0  # the compute thread waiting for the CPU's experts
        self.cpu_handoffs: list[tuple[float, int]] = []  # per CPU job: (hand-off s, step tokens)
        self.engines: CopyEngines | ModelledMachine | None = None
        self.t0 = 0.0
        self._step = 0
        self.host = None
        if not self.modelled:
            self._allocate(measured, longest)

    def _allocate(self, measured, longest: int) -> None:
        """Expert weights in host memory, the device slot pool, dense weights and activations."""
        torch, g, config, device, w = self.torch, self.geometry, self.config, self.device, self.config.workload
        check_host_memory(g, self.plan.expert_cache_slots, self.cuda)
        self.host = HostExperts(g, pinned=self.cuda, seed=config.seed)
        if self.options.weights_path:
            self.host.load_checkpoint(self.options.weights_path)
        self.shape = expert_shape(g)
        self.pool = SlotPool(self.plan.expert_cache_slots, self.shape.numel, self.host.dtype, device, self.shape)
        self.dense = DenseWeights(g, device, self.plan.kv_tokens or longest, seed=config.seed)
        self.masks = AttentionMasks(self.dense.kv_tokens, self.dense.dtype, device)
        max_tokens = max((r.prompt_tokens for r in measured), default=1) * w.max_batch + w.max_batch
        gen = torch.Generator().manual_seed(config.seed + 2)
        self.x = (torch.randn((max_tokens, g.hidden_size), generator=gen) * 0.1).to(device=device, dtype=self.host.dtype)
        self.out = torch.zeros_like(self.x)  # where the CPU's expert outputs come back to
        self.q = (torch.randn((max_tokens, self.dense.kv_width), generator=gen) * 0.1).to(device=device, dtype=self.host.dtype)

    # --- clock ----------------------------------------------------------------------------------
    def now(self) -> float:
        if self.modelled:
            return self.engines.now()
        return time.perf_counter() - self.t0

    # --- copies -----------------------------------------------------------------------------------
    def kick(self) -> None:
        """New work may be queued: wake the idle copy engines, and only them (lock held)."""
        if self.modelled:
            self.engines.wake()
            return
        idle = self.engines.idle if self.engines is not None else 0
        if idle and self.cache.has_work:
            self.engines.kicked_at = self.now()
            self.work.notify(idle)

    def _check(self) -> None:
        if self.engines is not None and self.engines.error is not None:
            raise RuntimeError(f"a copy engine failed: {self.engines.error!r}") from self.engines.error

    def _preload(self) -> None:
        """Initial residents, copied before the clock starts (the simulator starts with them in place)."""
        if self.plan.all_resident and not self.cpu_exec:  # (a placement on the CPU is the policy's choice)
            keys = [(la, e) for la in range(self.geometry.num_layers) for e in range(self.geometry.num_experts)]
        else:
            keys = list(self.policy.initial_residents())[: self.plan.expert_cache_slots]
        self.cache.preload(keys, 0.0)
        if self.modelled:
            return
        for key in sorted(self.cache.resident):
            slot = self.pool.assign(key, None)
            self.pool.buffers[slot].copy_(self.host.expert(*key))
        synchronize(self.device)

    # --- compute ----------------------------------------------------------------------------------
    def _attention(self, seqs) -> tuple[int, object]:
        """The step's attention rows: each new token scores the keys up to its own position."""
        cap = self.dense.kv_tokens
        contexts = [min(int(p) + 1, cap) for s in seqs for p in self.trace.position[s.start : s.stop].tolist()]
        return self.masks.rows(contexts)

    def _dense(self, layer: int, seqs, attention=None) -> None:
        if self.modelled:
            self.engines.compute(self.engines.dense_ticks(seqs))
            return
        tokens = sum(s.num_tokens for s in seqs)
        keys, bias = attention if attention is not None else self._attention(seqs)
        dense_layer(self.x[:tokens], self.dense.layers[layer], self.q[:tokens], self.dense.kv[layer], keys, bias)

    def _expert(self, key, tokens: int) -> None:
        if self.modelled:
            self.engines.compute(self.engines.expert_ticks(tokens))
            return
        swiglu(self.x[:tokens], *self.pool.matrices(key))
        if self.cuda:
            ev = self.torch.cuda.Event()
            ev.record()
            self.pool.mark_read(key, ev)

    def _warmup(self) -> None:
        """Each kernel shape once (oneDNN/cuBLAS pick and cache kernels per shape on first use)."""
        from finemoe.policies.base import Sequence

        counts = {1, *range(1, self.config.workload.max_batch * self.geometry.top_k + 1)}
        counts |= {self.trace.request(r).prompt_tokens for r in self.split.measure}
        counts = {c for c in counts if 0 < c <= self.x.shape[0]}
        scratch = self.torch.empty_like(self.pool.buffers[0]).copy_(self.host.expert(0, 0))
        for c in sorted(counts):
            expert_ffn(self.x[:c], scratch, self.shape)
        first = self.trace.iterations_by_request[self.split.measure[0]]
        for it in first[:2]:
            self._dense(0, (Sequence(it.request_id, it.iteration, it.start, it.stop),))
        # Every attention shape a decode step can take (rows: sequences, keys: whole buckets) and
        # each measured request's first step, set up once (oneDNN builds a kernel per new shape).
        cap = self.dense.kv_tokens
        for rows in range(1, self.config.workload.max_batch + 1):
            for keys in range(1, cap + KEY_BUCKET, KEY_BUCKET):
                keys, bias = self.masks.rows([min(keys, cap)] + [1] * (rows - 1))
                attend(self.q[:rows], self.dense.kv[0], keys, bias)
        for rid in self.split.measure:
            it = self.trace.iterations_by_request[rid][0]
            self._dense(0, (Sequence(it.request_id, it.iteration, it.start, it.stop),))
        if self.cpu_worker is not None:  # the CPU side's shapes, on its own thread
            self.cpu_worker.start(CpuJob([((0, 0), c) for c in sorted(counts)], max(counts)))
            self.cpu_worker.finish()
        synchronize(self.device)
        del scratch

    # --- the run ----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        trace, cache, rec, policy = self.trace, self.cache, self.rec, self.policy
        g = self.geometry
        ctx = PolicyContext(geometry=g, capacity_slots=self.plan.expert_cache_slots, seed=self.config.seed,
                            is_resident=cache.is_resident, is_in_flight=cache.is_in_flight,
                            expert_load_s=self.costs.expert_load_s, costs=self.costs)
        policy.bind(ctx)
        if policy.uses_history and not self.config.workload.online:
            policy.fit(trace.select_requests(self.split.history))
        self._preload()
        for rid, t in zip(self.split.measure, self.arrivals, strict=True):
            r = trace.request(rid)
            rec.request_arrived(rid, float(t), r.prompt_tokens, r.generated_tokens)
        batcher = build_batcher(trace, self.split.measure, self.arrivals, self.config.workload.max_batch)
        total_steps = sum(len(v) for k, v in trace.iterations_by_request.items() if k in set(self.split.measure))
        if self.cpu_exec and not self.modelled:
            self.cpu_worker = CpuWorker(self.host.expert, self.shape, self.x, self.out, self.now)
        if self.options.warmup and not self.modelled:
            self._warmup()

        self._step = 0
        wall0 = time.perf_counter()
        self.t0 = time.perf_counter()
        lock = self.lock
        if self.modelled:
            self.engines = ModelledMachine(trace, self.costs, cache, rec, self.config.hardware.copy_engines,
                                           lambda: self._step)
        else:
            self.engines = CopyEngines(max(1, self.config.hardware.copy_engines), cache, rec, lock, self.work,
                                       self.host.expert, self.pool, self.device, self.now, lambda: self._step)
        first_seen: set[int] = set()
        try:
            while not batcher.done:
                now = self.now()
                seqs = batcher.next_step(now)
                if not seqs:
                    nxt = batcher.next_arrival()
                    if self.modelled:
                        self.engines.idle_until(nxt or now)
                    else:
                        time.sleep(max(0.0, (nxt or now) - now))
                    continue
                self._run_step(self._step, seqs)
                synchronize(self.device)
                end = self.now()
                with lock:
                    for s in seqs:
                        if s.request_id not in first_seen:
                            first_seen.add(s.request_id)
                            rec.first_token(s.request_id, end)
                    for rid in batcher.finish_step():
                        rec.finished(rid, end)
                        if self.config.workload.online:
                            policy.on_request_finished(rid, trace)
                    rec.steps += 1
                    rec.layer_steps += self.geometry.num_layers * len(seqs)
                    rec.tokens += sum(s.num_tokens for s in seqs)
                    self._step += 1
                if self.progress:
                    self.progress(self._step, total_steps)
            makespan = self.now()
            self.engines.drain()
            self._check()
        finally:
            self.engines.close()
            if self.cpu_worker is not None:
                self.cpu_worker.close()
        rec.cpu_wait_s = self.cpu_wait_s
        wall = time.perf_counter() - wall0
        config = self.config.to_dict()
        config.update({
            "engine": "replay",
            "trace_hash": trace.content_hash(),
            "geometry": g.to_dict(),
            "memory_plan": self.plan.to_dict(),
            "split": self.split.to_dict(),
            "policy_info": policy.describe(),
            "replay": self._replay_info(),
        })
        return rec.to_result(config, wall_s=wall, makespan_s=makespan)

    def _replay_info(self) -> dict:
        """How the replay ran: its options, and what its copy engines and policy calls took."""
        info = {**self.options.to_dict(), "device": self.device, "threads": self.threads,
                "copy_engines": self.engines.engines, "copy_busy_s": list(self.engines.busy_s),
                "inline_copies": self.inline_copies, "policy_s": self.policy_s, "lane_copies": self.engines.copies}
        if self.cpu_worker is not None:  # the CPU thread's jobs, hand-off copies included
            handoffs = np.array(self.cpu_handoffs or [(0.0, 0)], dtype=float)
            info |= {"cpu_jobs": self.cpu_worker.jobs, "cpu_thread_busy_s": self.cpu_worker.busy_s,
                     "cpu_handoffs": len(self.cpu_handoffs), "cpu_handoff_mean_s": float(handoffs[:, 0].mean()),
                     "cpu_handoff_tokens_mean": float(handoffs[:, 1].mean())}
        if self.modelled:  # no weights, no threads: the copy threads' own work is nil
            return info | {"weights": None, "host_pinned": False, "lane_cache_s": 0.0, "lane_work_s": 0.0,
                           "handoff_mean_s": 0.0, "handoffs": 0, "wakeup_mean_s": 0.0, "wakeups": 0}
        engines = self.engines
        return info | {"weights": self.host.source, "host_pinned": self.host.pinned,
                       "lane_cache_s": engines.lane_cache_s, "lane_work_s": engines.work_s,
                       "handoff_mean_s": float(np.mean(engines.handoff_s)) if engines.handoff_s else 0.0,
                       "handoffs": len(engines.handoff_s),
                       "wakeup_mean_s": float(np.mean(self.wakeup_s)) if self.wakeup_s else 0.0,
                       "wakeups": len(self.wakeup_s)}

    def _stamp(self) -> float:
        """The time for a timeline record (the modelled clock without handling the events due)."""
        return self.engines.t * _S if self.modelled else self.now()

    def _observe(self) -> None:
        """Before looking at what is resident: a modelled clock lands the copies due by now."""
        if self.modelled:
            self.engines.now()

    def _submit(self, prefetches) -> None:
        """Queue a policy's prefetches (lock held); a modelled replay holds back unready predictions."""
        if self.modelled:
            self.engines.submit(prefetches)
        else:
            self.cache.add_prefetches(prefetches)

    def _compute_expert(self, step: int, layer: int, key, tokens: int, timeline: bool, missed: bool) -> None:
        """One routed expert computed (its weights resident), then its pin released."""
        t = self._stamp()
        self._expert(key, tokens)
        if timeline:
            synchronize(self.device)
        with self.lock:
            if timeline:
                self.rec.event("compute", "expert", step, layer, key[1], t, self._stamp(), missed)
            self.cache.unpin(key)
            if self.cache.blocked:
                if self.modelled:
                    self.engines.unblocked()
                else:
                    self.kick()

    def _run_step(self, step: int, seqs) -> None:
        cache, rec, policy, trace, lock = self.cache, self.rec, self.policy, self.trace, self.lock
        info = StepInfo(step, self.now(), seqs, trace)
        with lock:
            cache.set_position(step, -1)
            p0 = time.perf_counter()
            pf = policy.on_step_start(info)
            self.policy_s += time.perf_counter() - p0
            if pf:
                self._submit(pf)
            self.kick()
        timeline = step < self.config.timeline_steps
        step_tokens = sum(s.num_tokens for s in seqs)
        attention = None if self.modelled else self._attention(seqs)
        for layer in range(self.geometry.num_layers):
            t = self.now()
            self._dense(layer, seqs, attention)
            if timeline:
                synchronize(self.device)
                with lock:
                    rec.event("compute", "dense", step, layer, -1, t, self._stamp(), False)
            needed = needed_experts(trace, seqs, layer)
            keys = [(layer, e) for e, _ in needed]
            counts = dict(needed)
            with lock:
                now = self.now()
                cache.set_position(step, layer)
                # The simulator's order: the policy sees the routing, the experts are accessed (hits,
                # misses -> on-demand loads), those the CPU computes leave the queue, the rest are
                # pinned, and only then are the new prefetches queued.
                p0 = time.perf_counter()
                pf = policy.on_layer_routed(LayerRouting(info, layer, now, trace))
                self.policy_s += time.perf_counter() - p0
                missing = {k for k in keys if not cache.access(k[0], k[1], now)}
                later = ()
                if self.cpu_exec and missing:
                    keys, later = self._place(step, layer, keys, missing, counts, step_tokens, now, timeline)
                cache.pin(keys)
                if pf:
                    self._submit(pf)
                if later:
                    self._submit([Prefetch(0.0, step + 1, layer, e) for e in later])
                self.kick()
                if self.modelled:
                    self.engines.missed(len(missing))
            # As the simulator: the resident experts first (pinned since their access), in access
            # order; then the missed ones, each batch that has landed in access order.
            for key in keys:
                if key not in missing:
                    self._compute_expert(step, layer, key, counts[key[1]], timeline, False)
            pending = [k for k in keys if k in missing]
            while pending:
                with lock:
                    self._observe()
                    ready = [k for k in pending if cache.is_resident(k)]
                    if not ready:
                        self._wait_for(pending)
                        continue
                for key in ready:
                    pending.remove(key)
                    self._compute_expert(step, layer, key, counts[key[1]], timeline, True)
            if self.cpu_pending is not None or self.transient:
                self._layer_done(step, layer, timeline)

    def _place(self, step: int, layer: int, keys, missing: set, counts: dict, step_tokens: int, now: float,
               timeline: bool):
        """The policy's placement of this layer's misses (lock held): those the CPU computes leave
        the on-demand queue and `missing`, and the CPU side starts. Returns the keys the device
        computes and the experts to copy for the next step (CPU_AND_COPY)."""
        misses = [k[1] for k in keys if k in missing]
        p0 = time.perf_counter()
        split = split_misses(self.policy, layer, misses, [counts[e] for e in misses], step_tokens, now)
        self.policy_s += time.perf_counter() - p0
        self.transient.extend((layer, e) for e in split.once)
        if not split.cpu:
            return keys, ()
        on_cpu = {(layer, e) for e, _ in split.cpu}
        self.cache.withdraw_demands(on_cpu)
        missing -= on_cpu
        if self.modelled:
            spans, self.cpu_pending = self.cpu_timer.schedule(self.engines.t, step_tokens, split.cpu)
            record_cpu_layer(self.rec, self.geometry, step, layer, spans, step_tokens, timeline)
        else:
            self.cpu_pending = CpuJob([((layer, e), n) for e, n in split.cpu], step_tokens)
            self.cpu_worker.start(self.cpu_pending)
        return [k for k in keys if k not in on_cpu], split.later

    def _layer_done(self, step: int, layer: int, timeline: bool) -> None:
        """The layer's end on the device: its temporary copies leave their slots, then it waits for
        the layer's CPU experts (the wait is `cpu_wait_s`)."""
        if self.transient:
            with self.lock:
                self._observe()  # (modelled) the copies due by now land first, as in the simulator
                for key in self.transient:
                    if key in self.cache.resident and not self.modelled:
                        self.pool.release(key)
                self.cache.drop(self.transient, self.now())
                self.transient = []
                self.kick()
        pending, self.cpu_pending = self.cpu_pending, None
        if pending is None:
            return
        t = self.now()
        if self.modelled:
            if pending > self.engines.t:
                self.engines.advance(pending - self.engines.t)
        else:
            job = self.cpu_worker.finish()
            synchronize(self.device)
            self.cpu_handoffs.append((job.handoff_s, job.step_tokens))
            with self.lock:
                record_cpu_layer(self.rec, self.geometry, step, layer, job_spans(job), job.step_tokens, timeline)
        self.cpu_wait_s += self.now() - t

    def _wait_for(self, pending) -> None:
        """Block (lock held) until a copy makes one of `pending` resident: the simulator's stall.

        On CPU a stalled compute thread copies the next queued transfer itself (on-demand loads come
        first, so usually the one it waits for) instead of waking a copy thread and waiting to be woken
        back: on a busy machine each such hand-off costs a scheduler time slice, which no real DMA
        engine pays. On CUDA it just waits for the engines' events.
        """
        cache = self.cache
        t = self.now()
        if self.modelled:
            self.engines.wait_for(pending)
            self.rec.stall_s += self.now() - t
            return
        while not any(cache.is_resident(k) for k in pending):
            self._check()
            if not cache.in_flight and not cache.has_work:
                raise RuntimeError(
                    "replay deadlock: a routed expert is neither resident nor loading and nothing is queued "
                    f"(cache blocked={cache.blocked}, {cache.capacity} slots)"
                )
            if not self.cuda and cache.has_work and self._copy_inline():
                continue
            self.kick()
            self.lock.wait(0.5)
            done = self.engines.last_done
            if done is not None and done[0] in pending and cache.is_resident(done[0]):
                self.wakeup_s.append(self.now() - done[1])  # a copy thread's copy landed -> we run
        self.rec.stall_s += self.now() - t

    def _copy_inline(self) -> bool:
        """Take the next transfer and copy it on this thread (lock held on entry and exit)."""
        tr = self.cache.next_transfer(self.now())
        if tr is None:
            return False
        slot = self.pool.assign(tr.key, tr.victim)
        lane, step = f"copy{self.engines.engines}", self._step
        self.lock.release()
        try:
            start = self.now()
            self.pool.buffers[slot].copy_(self.host.expert(*tr.key))
            end = self.now()
        finally:
            self.lock.acquire()
        self.cache.complete(tr, end)
        self.rec.event(lane, tr.kind, step, tr.key[0], tr.key[1], start, end, tr.prefetch is None)
        self.inline_copies += 1
        return True
