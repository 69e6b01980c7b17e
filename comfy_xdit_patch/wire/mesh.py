"""Which ranks do what in one call: the layout (`Mesh`: CFG/batch groups x Ulysses x Ring degrees), chosen on
ComfyUI's side for each call and sent to the ranks with it. Arithmetic only: imports no torch.
"""
from __future__ import annotations

from ..config import Mesh
from ..errors import LayoutError

__all__ = ["Mesh", "LayoutError", "shares", "batch_spans", "spanning", "choose_mesh"]


def shares(total: int, parts: int) -> tuple[int, ...]:
    """`total` items shared out among `parts` takers in order, as evenly as can be: the first ones take one more.
    None is left empty: the caller refuses `total < parts` with its own error."""
    assert total >= parts > 0, (total, parts)
    return tuple(total // parts + (1 if i < total % parts else 0) for i in range(parts))


def batch_spans(batch: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, as-even-as-possible split of `batch` rows into `parts` non-empty spans."""
    if batch < parts:
        raise LayoutError(f"batch of {batch} can't be shared by {parts} CFG groups")
    spans, start = [], 0
    for s in shares(batch, parts):
        spans.append((start, start + s))
        start += s
    return spans


def spanning(mesh: Mesh, node_of: tuple = (), kind: str = "sp") -> int:
    """How many of the mesh's `kind` groups ("sp", or "ulysses") hold ranks of more than one node.
    node_of: each rank's node (any hashable), ranks ordered as worker.build_groups numbers them."""
    if len(set(node_of)) < 2:
        return 0
    size = mesh.sp if kind == "sp" else mesh.ulysses
    # ulysses groups are consecutive ranks, as are sp groups (build_groups); so blocks of `size` ranks
    return sum(len({node_of[r] for r in range(b, b + size)}) > 1 for b in range(0, mesh.world, size))


def choose_mesh(world: int, batch: int, heads: int, forced: Mesh | None, ring_ok: bool, gather: bool = False,
                node_of: tuple = ()) -> Mesh:
    """The layout of one call. Auto: the batch (cond+uncond, latent batch) is shared out first, since
    it needs no communication but one gather; the rest of the ranks split the sequence, Ulysses first
    (heads permitting), Ring for what the heads can't divide. With the K/V-gather attention
    (`gather`), which takes any head count, the `ulysses` degree is its degree and there is no ring.

    Across nodes (`node_of`, each rank's node, ranks grouped by node: see group/ray_nodes.rank_order) the largest
    CFG/batch split is also what keeps the all-to-alls off the network: each sequence-parallel group is a
    block of consecutive ranks, so with cfg = nodes each sits on one node. Where the batch leaves a group
    spanning nodes (cfg 1), Ulysses stays inside a node and Ring (point-to-point, overlapped with
    attention) crosses nodes, when the ring is available; else Ulysses crosses (the router says so)."""
    if forced is not None:
        mesh = forced
    else:
        cfg = max(d for d in range(1, world + 1) if world % d == 0 and batch % d == 0)
        sp = world // cfg
        fits = [d for d in range(1, sp + 1) if sp % d == 0 and (gather or heads % d == 0)]
        if ring_ok and not gather and spanning(Mesh(cfg, sp, 1), node_of):
            fits = [d for d in fits if not spanning(Mesh(cfg, d, sp // d), node_of, "ulysses")] or fits
        ulysses = max(fits)
        mesh = Mesh(cfg, ulysses, sp // ulysses)
    if mesh.world != world:
        raise LayoutError(f"layout {mesh} needs {mesh.world} ranks, the group has {world}")
    if mesh.cfg > batch:
        raise LayoutError(f"layout {mesh}: a batch of {batch} can't feed {mesh.cfg} CFG groups")
    if heads % mesh.ulysses and not gather:
        raise LayoutError(f"layout {mesh}: {heads} attention heads don't divide by ulysses={mesh.ulysses}")
    if mesh.ring > 1 and not ring_ok:
        raise LayoutError(f"layout {mesh}: ring > 1 needs the yunchang attention backend (CUDA)")
    return mesh
