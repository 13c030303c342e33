"""torch's CPU thread count, chosen by timing the run's own iterations.

torch starts one thread per core, and its threads wait on each other at every small parallel
region. On a machine whose cores other processes use, each wait can cost a whole scheduler slice:
``benchmarks/meta_step.py --tasks 8 --contention 2`` on 2 cores took 5.6x its quiet time with 2
threads and about 4x with 1. No load average tells which count is fastest (it counts this run's
own threads and lags by a minute), so ``ThreadTuner`` measures: it runs a few iterations at each
candidate count (all the cores, half, ... 1), keeps the fastest, and tries them all again after a
while or as soon as iterations become markedly slower than they were when it chose (the machine's
load has changed).
"""

from __future__ import annotations

import statistics
from typing import List, Optional

import torch


def candidates(most: int) -> List[int]:
    """``most``, ``most // 2``, ... down to 1."""
    counts, n = [], max(1, int(most))
    while True:
        counts.append(n)
        if n == 1:
            return counts
        n //= 2


class ThreadTuner:
    """Call ``step(seconds)`` after every iteration with its wall time; it sets
    ``torch.set_num_threads`` for the next one.

    Each trial runs ``trial_steps`` iterations at one count and scores the median of all but the
    first (a switch's first iteration pays for it). The best count is then held for
    ``hold_steps`` iterations, or until ``slow_steps`` iterations in a row take over ``slowdown``
    times the chosen score; then every count is tried again, starting with the one in use.
    """

    def __init__(self, most: Optional[int] = None, trial_steps: int = 3, hold_steps: int = 50,
                 slowdown: float = 1.5, slow_steps: int = 3):
        if trial_steps < 2:
            raise ValueError(f"trial_steps must be at least 2 (the first after a switch is not scored), got {trial_steps}")
        self.counts = candidates(most or torch.get_num_threads())
        self.trial_steps, self.hold_steps = trial_steps, hold_steps
        self.slowdown, self.slow_steps = slowdown, slow_steps
        self.chosen: Optional[int] = None
        self.score: Optional[float] = None
        self.history: List[tuple] = []  # (threads, score) of every finished trial
        self._start_trials(self.counts[0])

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def _start_trials(self, first: int) -> None:
        self._queue = [first] + [n for n in self.counts if n != first]
        self._scores = {}
        self._times: List[float] = []
        self._held = self._slow = 0
        torch.set_num_threads(self._queue[0])

    def step(self, seconds: float) -> None:
        if self._queue:
            self._times.append(float(seconds))
            if len(self._times) < self.trial_steps:
                return
            count = self._queue.pop(0)
            self._scores[count] = statistics.median(self._times[1:])
            self.history.append((count, self._scores[count]))
            self._times = []
            if self._queue:
                torch.set_num_threads(self._queue[0])
                return
            self.chosen = min(self._scores, key=self._scores.get)
            self.score = self._scores[self.chosen]
            torch.set_num_threads(self.chosen)
            return
        self._held += 1
        self._slow = self._slow + 1 if seconds > self.slowdown * self.score else 0
        if self._held >= self.hold_steps or self._slow >= self.slow_steps:
            self._start_trials(self.chosen)
