"""Per-model-family knowledge, kept declarative: one Plan per family (plans/flux.py, plans/wan.py), and the registry.

A Plan names where a model's token sequence is split (the method where it is entered, with the text/image
streams and their position ids, or the seam around its blocks), which output is gathered, which attention
keeps its keys whole, and which inputs the workers must refuse. Both processes read plans: ComfyUI's side
checks a call against one (driver/calls.py), a rank applies one to run its share of the call
(rank/sharding.py). Imports no torch.
"""
from __future__ import annotations

from . import flux, wan
from .plan import BlockSeam, Plan, bind, head_count

PLANS = flux.PLANS + wan.PLANS


def by_family(family: str) -> Plan:
    return next(p for p in PLANS if p.family == family)


def routed() -> str:
    """The families this ComfyUI has, as the logs name them: "FLUX, Chroma and Wan"."""
    names = [p.name for p in PLANS if p.model_type() is not None]
    return " and ".join(filter(None, (", ".join(names[:-1]), names[-1]))) if names else "no family"


def plan_for(diffusion_model) -> Plan | None:
    for plan in PLANS:
        cls = plan.model_type()
        if cls is not None and type(diffusion_model) is cls:
            return plan
    return None


__all__ = ["Plan", "BlockSeam", "PLANS", "by_family", "plan_for", "routed", "head_count", "bind"]
