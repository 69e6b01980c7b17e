"""Per-model-family knowledge, kept declarative: one Plan per family (plans/flux.py), and the registry.

A Plan names the method where a model's token sequence is entered (its inputs are split there), the
text/image streams and their position ids, which output is gathered, and which inputs the workers
must refuse. Both processes read plans: ComfyUI's side checks a call against one (driver/calls.py), a
rank applies one to run its share of the call (rank/sharding.py). Imports no torch.
"""
from __future__ import annotations

from .flux import PLANS
from .plan import Plan, bind, head_count


def by_family(family: str) -> Plan:
    return next(p for p in PLANS if p.family == family)


def plan_for(diffusion_model) -> Plan | None:
    for plan in PLANS:
        cls = plan.model_type()
        if cls is not None and type(diffusion_model) is cls:
            return plan
    return None


__all__ = ["Plan", "PLANS", "by_family", "plan_for", "head_count", "bind"]
