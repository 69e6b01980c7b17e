"""Which node each rank sits on, when the group spans the nodes of a joined Ray cluster.

Ray places the bundles (one per rank); this module only reads where they landed and numbers the ranks
so that each node holds a block of consecutive ranks. worker.build_groups makes every sequence-parallel
group a block of consecutive ranks too, so with the CFG/batch split across nodes (plans.layout.choose_mesh)
no all-to-all crosses the network.
"""
from __future__ import annotations

import math


def room(nodes: list[dict], bundle: dict) -> int:
    """How many `bundle`s the alive nodes of `ray.nodes()` hold in total (resources, not what is free)."""
    total = 0
    for n in nodes:
        if not n.get("Alive"):
            continue
        have = n.get("Resources", {})
        total += min(math.floor(have.get(k, 0) / v + 1e-9) for k, v in bundle.items())
    return total


def rank_order(bundle_nodes: list, first=None) -> list[int]:
    """Bundle index for each rank: bundles grouped by node, the node `first` (the driver's) first, then
    nodes in order of their first bundle. Rank 0, which sends the output back, is then next to the driver."""
    seen = list(dict.fromkeys(bundle_nodes))
    if first in seen:
        seen.remove(first)
        seen.insert(0, first)
    return sorted(range(len(bundle_nodes)), key=lambda b: (seen.index(bundle_nodes[b]), b))


def absent_message(replies: dict) -> str:
    """One line naming each node and the model files missing there; replies: rank -> (node, [paths])."""
    where: dict = {}
    for rank, (node, paths) in sorted(replies.items()):
        for p in paths:
            where.setdefault((node, p), []).append(rank)
    parts = [f"{p} is missing on node {node} (rank{'s' * (len(r) > 1)} {','.join(map(str, r))})"
             for (node, p), r in where.items()]
    return "model file " + "; ".join(parts) + ": copy it there under the same path, or use a shared filesystem"
