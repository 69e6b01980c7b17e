"""How many pieces the Ulysses all-to-all is cut into, chosen by timing real calls.

More pieces hide more of the exchange behind attention, but each attention kernel then gets fewer
heads, and below about one wave of thread blocks the GPU idles. Which wins depends on the GPU, the
sequence length and the heads per rank, so for each (input shape, layout) the first calls try each
candidate twice and the fastest is kept. Results are identical for every choice (per-head maths).
The driver decides and sends the choice with each call, so all ranks agree.
"""
from __future__ import annotations

import collections

CANDIDATES = (1, 2, 3, 4)
TRIALS = 2


class ChunkTuner:
    def __init__(self, fixed: int | None):
        self.fixed = fixed
        self._todo: dict = {}
        self._times: dict = collections.defaultdict(lambda: collections.defaultdict(list))
        self.best: dict = {}

    def choose(self, key, heads_per_rank: int) -> int:
        if self.fixed is not None:
            return self.fixed if heads_per_rank % self.fixed == 0 else 1
        if key in self.best:
            return self.best[key]
        todo = self._todo.setdefault(key, [c for c in CANDIDATES if heads_per_rank % c == 0 for _ in range(TRIALS)])
        return todo[0]

    def record(self, key, chunks: int, seconds: float) -> None:
        todo = self._todo.get(key)
        if self.fixed is not None or key in self.best or not todo or todo[0] != chunks:
            return
        todo.pop(0)
        self._times[key][chunks].append(seconds)
        if not todo:
            times = self._times.pop(key)
            self.best[key] = min(times, key=lambda c: min(times[c]))
