"""How eagerly to prefetch, chosen by the clock: a prefetch gate's costs are a model's guesses, and
when they disagree with the time a step takes, the time wins.

The same gate that pays on one trace loses on another (docs/evaluation.md, 4c: prefetching every
prediction with p >= 0.5 is the fastest policy on the LMSYS trace, prefetching nothing is the
fastest on the Qwen3 log at 512 slots, where the link is 90% busy without a single prefetch). A CPU
prefetcher faces the same choice and settles it by feedback (Srinath et al., "Feedback Directed
Prefetching", HPCA 2007, throttle by measured accuracy and pollution); here the feedback is the
quantity being optimised: the measured time per decoded token under each mode.

The schedule: epochs of `epoch_steps` decode steps, each under one mode; the first step after a
switch is not measured (it pays for the last mode's cache). Each mode is tried once, in order;
then the mode with the lowest time per token runs, and every other mode is tried again for one epoch
after `wait` epochs, its wait doubling each time it loses again (quadrupling when it loses by more
than `far_margin`), so a mode that keeps losing costs a logarithmic share of the run, and starting
over when it wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModeRecord:
    """What one mode has measured: time per token (a mean weighted toward its latest epoch)."""

    per_token_s: float | None = None
    last_epoch: int = -1
    wait: int = 0


@dataclass
class PrefetchThrottle:
    """Picks one of `modes` per epoch from measured time per token; pure bookkeeping, no clock."""

    modes: tuple[str, ...]
    epoch_steps: int = 4
    first_wait: int = 4
    far_margin: float = 0.1  # a mode losing by more than this share waits four times as long, not twice
    records: dict[str, ModeRecord] = field(init=False)
    mode: str = field(init=False)
    epoch: int = field(default=0, init=False)
    _steps: int = field(default=0, init=False)
    _time_s: float = field(default=0.0, init=False)
    _tokens: int = field(default=0, init=False)
    _settling: bool = field(default=False, init=False)
    switches: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not self.modes:
            raise ValueError("a throttle needs at least one mode")
        if self.epoch_steps < 2:
            raise ValueError(f"an epoch needs at least 2 steps (one settles), got {self.epoch_steps}")
        self.records = {m: ModeRecord(wait=self.first_wait) for m in self.modes}
        self.mode = self.modes[0]

    def step_done(self, duration_s: float, tokens: int) -> None:
        """One decode step of `tokens` tokens took `duration_s` under the current mode."""
        if tokens <= 0 or not duration_s >= 0:
            return
        self._steps += 1
        if self._settling:
            self._settling = False
        else:
            self._time_s += duration_s
            self._tokens += tokens
        if self._steps >= self.epoch_steps:
            self._end_epoch()

    def _end_epoch(self) -> None:
        record = self.records[self.mode]
        measured = self._time_s / self._tokens  # an epoch measures all its steps but at most one
        record.per_token_s = measured if record.per_token_s is None else 0.5 * (record.per_token_s + measured)
        record.last_epoch = self.epoch
        self.epoch += 1
        self._steps, self._time_s, self._tokens = 0, 0.0, 0
        chosen = self._next_mode()
        if chosen != self.mode:
            self.switches += 1
            self._settling = True
        self.mode = chosen

    def best(self) -> str:
        """The measured mode with the lowest time per token (the first mode while none is measured)."""
        measured = [m for m in self.modes if self.records[m].per_token_s is not None]
        if not measured:
            return self.modes[0]
        return min(measured, key=lambda m: (self.records[m].per_token_s, self.modes.index(m)))

    def _next_mode(self) -> str:
        for m in self.modes:
            if self.records[m].last_epoch < 0:
                return m  # not tried yet
        best = self.best()
        self.records[best].wait = self.first_wait
        if self.mode != best:  # the mode just explored lost: wait two (or four) times as long to retry it
            far = self.records[self.mode].per_token_s > (1.0 + self.far_margin) * self.records[best].per_token_s
            self.records[self.mode].wait *= 4 if far else 2
            return best
        due = [m for m in self.modes if m != best and self.epoch - self.records[m].last_epoch > self.records[m].wait]
        return min(due, key=lambda m: self.records[m].last_epoch) if due else best
