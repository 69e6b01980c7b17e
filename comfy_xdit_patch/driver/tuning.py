"""How many pieces the Ulysses all-to-all is cut into, chosen by timing real calls.

More pieces hide more of the exchange behind attention, but each attention kernel then gets fewer
heads, and below about one wave of thread blocks the GPU idles. Which wins depends on the GPU, the
sequence length and the heads per rank, so for each (input shape, layout) the first calls try each
candidate three times and the one whose third call was fastest is kept (on GPUs a rank runs a new
call shape eagerly, then captures it as a CUDA graph, then replays it: the third call is the one
that counts). Results are identical for every choice (per-head maths). The driver decides and sends
the choice with each call, so all ranks agree.

Besides equal pieces, one tapered schedule is tried (rank/attention/ulysses.py): with equal pieces the
first piece's arrival and the last one's departure are exposed, each 1/g of the exchange; small first
and last pieces expose less, if the larger middle piece still arrives while the first one computes.
"""
from __future__ import annotations

import collections

CANDIDATES = (1, 2, 3)
TRIALS = 3


def tapered(heads_per_rank: int) -> tuple[int, ...] | None:
    """Heads per piece, small first and last (a sixth of the heads each, at least one): 12 -> (2, 8, 2)."""
    edge = max(1, heads_per_rank // 6)
    return (edge, heads_per_rank - 2 * edge, edge) if heads_per_rank >= 4 else None


def candidates(heads_per_rank: int) -> list:
    out: list = [c for c in CANDIDATES if heads_per_rank % c == 0]
    taper = tapered(heads_per_rank)
    if taper is not None and len(set(taper)) > 1:
        out.append(taper)
    return out


class ChunkTuner:
    def __init__(self, fixed: int | None):
        self.fixed = fixed
        self._todo: dict = {}
        self._times: dict = collections.defaultdict(dict)  # key -> {chunks: seconds of the latest trial}
        self.best: dict = {}

    def choose(self, key, heads_per_rank: int) -> int | tuple[int, ...]:
        if self.fixed is not None:
            return self.fixed if heads_per_rank % self.fixed == 0 else 1
        if key in self.best:
            return self.best[key]
        todo = self._todo.setdefault(key, [c for c in candidates(heads_per_rank) for _ in range(TRIALS)])
        return todo[0]

    def record(self, key, chunks, seconds: float) -> None:
        todo = self._todo.get(key)
        if self.fixed is not None or key in self.best or not todo or todo[0] != chunks:
            return
        todo.pop(0)
        self._times[key][chunks] = seconds
        if not todo:
            times = self._times.pop(key)
            self.best[key] = min(times, key=times.get)
