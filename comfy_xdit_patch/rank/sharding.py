"""A rank's share of one model call: the plan applied over a mesh (CFG/batch groups, then the sequence).

`shard` splits the batch among CFG groups, then the sequence: the plan's entry method splits the text and
image streams (with their position ids) and gathers the image tokens at its end (FLUX), or the plan's seam
around the blocks splits the stream, its RoPE freqs and modulation before the first block and gathers after
the last (Wan); the sequence-parallel attention is swapped in for this call only, and attention that keeps its
keys whole (the plan's `whole_keys`) runs ComfyUI's own. Every rank returns the full output.
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


def _seamed(plan: Plan, model, bound: inspect.BoundArguments, sp_group, sp_rank: int, sp_world: int,
            attention: Callable) -> None:
    """Make this call's blocks run on this rank's share of the sequence, through ComfyUI's block-replace seam."""
    seam = plan.seam
    count = len(getattr(model, seam.blocks))
    repeat = seam.repeat_fn()
    call: dict = {}  # the shards, this call's override, and the local share of each full tensor seen

    def local(key, full, me, tokens):
        if call.get(("full", key)) is not full:  # NOTE: the blocks share one RoPE / modulation tensor
            share = (layout.take_rows(full, tokens, me.img, me.pad, repeat) if key in seam.modulation
                     else layout.take(full, me.img, me.pad))
            call[("full", key)], call[("local", key)] = full, share
        return call[("local", key)]

    def replace(index: int):
        def run(args: dict, extra: dict) -> dict:
            stream = seam.tokens[0]
            if index == 0:
                tokens = args[stream].shape[1]
                call["shards"] = shards = layout.split(0, tokens, sp_world)
                call["tokens"], me = tokens, shards[sp_rank]
                call["override"] = attention(me)
                args = dict(args, **{stream: layout.take(args[stream], me.img, me.pad)})
            me = call["shards"][sp_rank]
            args = dict(args, transformer_options=dict(args["transformer_options"],
                                                       optimized_attention_override=call["override"]))
            for key in seam.tokens[1:] + seam.modulation:
                args[key] = local(key, args[key], me, call["tokens"])
            out = extra["original_block"](args)
            if index == count - 1:
                out = dict(out, **{stream: layout.gather(out[stream], call["shards"], sp_rank, sp_group)})
            return out

        return run

    options = dict(bound.arguments.get("transformer_options") or {})
    replaces = dict(options.get("patches_replace", {}))
    replaces[seam.patches] = {**replaces.get(seam.patches, {}), **{(seam.kind, i): replace(i) for i in range(count)}}
    options["patches_replace"] = replaces
    bound.arguments["transformer_options"] = options


def _keep_keys_whole(plan: Plan, model) -> None:
    """Once per model: the plan's `whole_keys` modules of each block (cross-attention) run ComfyUI's own
    attention. Their keys and values (the text, the CLIP image) are whole on every rank: each rank's queries
    attend all of them, with no exchange. Told apart by module, not by shape: a share of the video can have
    as many tokens as the text."""
    if not plan.whole_keys or getattr(model, "_comfy_xdit_keys_whole", False):
        return
    # NOTE: hooks stay for the model's life (its blocks may be compiled: dynamo must see them from the start)
    for name in plan.blocks:
        for block in getattr(model, name, ()):
            for attr in plan.whole_keys:
                getattr(block, attr).register_forward_pre_hook(_without_override, with_kwargs=True)
    model._comfy_xdit_keys_whole = True


def _without_override(_module, args, kwargs):
    options = kwargs.get("transformer_options")
    if not options or "optimized_attention_override" not in options:
        return None
    options = {k: v for k, v in options.items() if k != "optimized_attention_override"}
    return args, dict(kwargs, transformer_options=options)


def shard(plan: Plan, model, args: tuple, kwargs: dict, mesh: Mesh, rank: int, groups, attention) -> torch.Tensor:
    """Run model.forward(*args, **kwargs) as one rank of `mesh`; every rank returns the full output.

    `groups` gives the sp and cfg process groups of this rank; `attention(shard)` builds the
    attention override for this rank's shard of the sequence.
    """
    _keep_keys_whole(plan, model)
    if mesh.world == 1:
        return model(*args, **kwargs)
    bound = bind(model, args, kwargs)
    cfg_index, sp_rank = divmod(rank, mesh.sp)
    spans = None
    if mesh.cfg > 1:
        batch = next(iter(bound.arguments.values())).shape[0]
        spans = batch_spans(batch, mesh.cfg)
        _split_batch(bound, batch, spans[cfg_index])
    if mesh.sp > 1 and plan.seam is not None:
        _seamed(plan, model, bound, groups.sp, sp_rank, mesh.sp, attention)
        out = model(*bound.args, **bound.kwargs)
    elif mesh.sp > 1:
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
