"""The Plan type: one model family's knowledge, declarative (plans/flux.py holds FLUX's)."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import Any


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


def head_count(plan: Plan, model) -> int:
    return int(getattr(model, plan.heads_attr))


@functools.lru_cache(maxsize=None)
def _signature(cls) -> inspect.Signature:
    sig = inspect.signature(cls._forward)
    return sig.replace(parameters=list(sig.parameters.values())[1:])  # without self


def bind(model, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    return _signature(type(model)).bind(*args, **kwargs)
