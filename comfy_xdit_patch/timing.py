"""One stopwatch for the start-up timings the status document shows (group phases, a rank's start, the
early start's timeline): each step reads the clock once."""
from __future__ import annotations

import time


class Laps:
    """Seconds per named step: since the step before (laps), or since the start (`cumulative`)."""

    def __init__(self, cumulative: bool = False, clock=time.perf_counter):
        self.clock, self.cumulative = clock, cumulative
        self.began = self.mark = clock()
        self.seconds: dict[str, float] = {}

    def __call__(self, step: str) -> None:
        now = self.clock()
        self.seconds[step] = round(now - (self.began if self.cumulative else self.mark), 3)
        self.mark = now

    def total(self) -> float:
        return self.clock() - self.began
