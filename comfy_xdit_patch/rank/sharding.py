"""A rank's share of one model call: the plan applied over a mesh (CFG/batch groups, then the sequence).

`shard` splits the batch among CFG groups, makes the plan's entry method split the text and image streams
(with their position ids) and gather the image tokens at its end, and swaps in the sequence-parallel
attention for this call only; every rank returns the full output.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import torch
import torch.utils._pytree as pytree

from ..config import Mesh
from ..plans.plan import Plan, bind
from ..wire.mesh import batch_spans
from . import layout

def _split_batch(bound: inspect.BoundArguments, batch: int, span: tuple[int, int]) -> None:
    def cut(t):
        return t[span[0]:span[1]] if t.ndim and t.shape[0] == batch else t

    for name, value in bound.arguments.items():
        if name != "transformer_options":
            bound.arguments[name] = pytree.tree_map_only(torch.Tensor, cut, value)


@contextlib.contextmanager
def _entered(plan: Plan, model, sp_group, sp_rank: int, sp_world: int, attention: Callable):
    """Make `model.<entry>` split its sequence inputs and gather its output, for this call only."""
    original = getattr(model, plan.entry)
    signature = inspect.signature(original)

    def sharded_entry(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        a = bound.arguments
        for name in plan.entry_none:
            if a.get(name) is not None:
                raise RuntimeError(f"{plan.family}: {name} reached a worker; it can't be sharded")
        txt, txt_ids = plan.txt
        img, img_ids = plan.img
        shards = layout.split(a[txt].shape[1], a[img].shape[1], sp_world)
        me = shards[sp_rank]
        a[txt], a[txt_ids] = layout.take(a[txt], me.txt), layout.take(a[txt_ids], me.txt)
        a[img], a[img_ids] = layout.take(a[img], me.img, me.pad), layout.take(a[img_ids], me.img, me.pad)
        if a.get(plan.control) is not None:
            local = me.img_len + me.pad
            a[plan.control] = pytree.tree_map_only(
                torch.Tensor, lambda r: layout.take_prefix(r, me.img, local), a[plan.control])
        options = dict(a.get("transformer_options") or {})
        options["optimized_attention_override"] = attention(me)
        a["transformer_options"] = options
        out = original(*bound.args, **bound.kwargs)
        return layout.gather(out, shards, sp_rank, sp_group)

    setattr(model, plan.entry, sharded_entry)  # NOTE: instance attribute on the worker's own model copy
    try:
        yield
    finally:
        delattr(model, plan.entry)


def shard(plan: Plan, model, args: tuple, kwargs: dict, mesh: Mesh, rank: int, groups, attention) -> torch.Tensor:
    """Run model.forward(*args, **kwargs) as one rank of `mesh`; every rank returns the full output.

    `groups` gives the sp and cfg process groups of this rank; `attention(shard)` builds the
    attention override for this rank's shard of the sequence.
    """
    if mesh.world == 1:
        return model(*args, **kwargs)
    bound = bind(model, args, kwargs)
    cfg_index, sp_rank = divmod(rank, mesh.sp)
    spans = None
    if mesh.cfg > 1:
        batch = next(iter(bound.arguments.values())).shape[0]
        spans = batch_spans(batch, mesh.cfg)
        _split_batch(bound, batch, spans[cfg_index])
    if mesh.sp > 1:
        with _entered(plan, model, groups.sp, sp_rank, mesh.sp, attention):
            out = model(*bound.args, **bound.kwargs)
    else:
        out = model(*bound.args, **bound.kwargs)
    if spans is not None:
        out = gather_batch(out, spans, cfg_index, groups.cfg)
    return out


def gather_batch(local: torch.Tensor, spans, index: int, group) -> torch.Tensor:
    longest = max(b - a for a, b in spans)
    mine = spans[index][1] - spans[index][0]
    buf = local if mine == longest else torch.cat([local, local.new_zeros((longest - mine,) + local.shape[1:])])
    parts = [torch.empty_like(buf) for _ in spans]
    # NOTE: collective over the ranks that hold the same sequence piece in each CFG group.
    torch.distributed.all_gather(parts, buf.contiguous(), group=group)
    return torch.cat([p[: b - a] for p, (a, b) in zip(parts, spans)])
