"""ComfyUI's side of one model call: can it be sent to the ranks at all, and in what form.

`check` binds the call to the model's forward, refuses what a plan names (or what can't cross to another
process), keeps only the transformer_options the model's own code reads, and lists the tensors that
stay the same through a sampling run (they cross once per run).
"""
from __future__ import annotations

import dataclasses
import operator
import uuid

import torch
import torch.utils._pytree as pytree

from ..plans.plan import Plan, bind

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
