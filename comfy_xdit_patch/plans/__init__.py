"""Per-model-family knowledge, kept declarative, and the generic code that applies it.

A Plan names the method where a model's token sequence is entered (its inputs are split there), the
text/image streams and their position ids, which output is gathered, and which inputs the workers
must refuse. `shard()` applies a plan on a worker for one call; `check()` runs on ComfyUI's side.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import operator
import uuid
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from . import layout
from .layout import LayoutError, Mesh


@dataclasses.dataclass(frozen=True)
class Plan:
    family: str
    model_class: str  # "module:Class" of the diffusion model (patcher.model.diffusion_model)
    entry: str  # method whose sequence inputs are split and whose output is gathered
    txt: tuple[str, str]  # entry arguments: text tokens, text position ids
    img: tuple[str, str]  # entry arguments: image tokens (+ reference tokens), image position ids
    control: str  # entry argument holding ControlNet residuals over the image tokens
    heads_attr: str  # attribute with the attention head count
    # (forward() argument, value that can't be routed or None for "any value but None", why)
    refuse: tuple[tuple[str, Any, str], ...] = ()
    # forward() arguments whose absent value comes from a model attribute (object patches can set it)
    defaults: tuple[tuple[str, str], ...] = ()
    # entry arguments that must be None on a worker (a safety net behind `refuse`)
    entry_none: tuple[str, ...] = ()
    # forward() arguments that stay the same for a whole sampling run (they cross once per run)
    static: tuple[str, ...] = ()
    # model attributes holding its transformer blocks (what COMFY_XDIT_COMPILE compiles)
    blocks: tuple[str, ...] = ()
    # transformer_options keys the model's own code reads (others only matter to wrappers outside it)
    reads_options: tuple[str, ...] = ("patches", "patches_replace", "rope_options", "optimized_attention_override")

    def model_type(self) -> type | None:
        module, _, name = self.model_class.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # older ComfyUI without this family
            return None


def by_family(family: str) -> Plan:
    from .flux import PLANS

    return next(p for p in PLANS if p.family == family)


def plan_for(diffusion_model) -> Plan | None:
    from .flux import PLANS

    for plan in PLANS:
        cls = plan.model_type()
        if cls is not None and type(diffusion_model) is cls:
            return plan
    return None


# --- ComfyUI's side: can this call be sent at all? -------------------------------------------------

_DROPPED_OPTIONS = ("wrappers", "callbacks")  # ComfyUI's own plumbing; workers need none of it
_PLAIN = (type(None), bool, int, float, str, uuid.UUID, torch.Tensor, torch.dtype, torch.device)


def _plain(value) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int, tuple)) and _plain(v) for k, v in value.items())
    return False


@functools.lru_cache(maxsize=None)
def _signature(cls) -> inspect.Signature:
    sig = inspect.signature(cls._forward)
    return sig.replace(parameters=list(sig.parameters.values())[1:])  # without self


def bind(model, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    return _signature(type(model)).bind(*args, **kwargs)


@dataclasses.dataclass
class Checked:
    reason: str | None  # why it must run locally, or None
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)  # transformer_options made sendable
    static: list = dataclasses.field(default_factory=list)  # tensors that repeat through the run


def check(plan: Plan, model, args: tuple, kwargs: dict) -> Checked:
    bound = bind(model, args, kwargs)
    extra = bound.arguments.get("kwargs", {})
    defaults = dict(plan.defaults)
    for name, value, why in plan.refuse:
        got = bound.arguments.get(name, extra.get(name))
        if got is None and name in defaults:
            got = operator.attrgetter(defaults[name])(model)
        if (value is None and got is not None) or (value is not None and got == value):
            return Checked(why)
    options = dict(bound.arguments.get("transformer_options") or {})
    for key in _DROPPED_OPTIONS:
        options.pop(key, None)
    for key in ("patches", "patches_replace"):
        if any(options.pop(key, {}).values()):
            return Checked(f"transformer_options['{key}'] set by another node")
    if "optimized_attention_override" in options:
        return Checked("another node's attention override")
    for key, value in list(options.items()):
        if key not in plan.reads_options:
            # NOTE: e.g. the run's uuids and sigmas, EasyCache's state: only wrappers outside the model read
            # them. Kept, they would make each sampling run a new call signature on the ranks (one eager
            # call and one CUDA graph capture per image).
            del options[key]
        elif not _plain(value):
            return Checked(f"transformer_options['{key}'] holds {type(value).__name__}")
    for name, value in bound.arguments.items():
        if name != "transformer_options" and not _plain(value):
            return Checked(f"argument {name} holds {type(value).__name__}")
    bound.arguments["transformer_options"] = options
    static = []
    for name in plan.static:
        static += [v for v in pytree.tree_leaves(bound.arguments.get(name, extra.get(name))) if isinstance(v, torch.Tensor)]
    return Checked(None, bound.args, bound.kwargs, static)


# --- the worker's side: run one call over a mesh ---------------------------------------------------

def head_count(plan: Plan, model) -> int:
    return int(getattr(model, plan.heads_attr))


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
        spans = layout.batch_spans(batch, mesh.cfg)
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


__all__ = ["Plan", "plan_for", "check", "shard", "head_count", "LayoutError", "Mesh"]
