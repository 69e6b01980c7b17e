"""The Plan type: one model family's knowledge, declarative (plans/flux.py holds FLUX's, plans/wan.py Wan's)."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import Any


def _resolve(name: str):
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):  # older ComfyUI without this family
        return None


@dataclasses.dataclass(frozen=True)
class BlockSeam:
    """Where a model that patch-embeds inside its entry method (Wan) has its sequence split: around its block
    list, through ComfyUI's block-replace seam, transformer_options["patches_replace"][patches][(kind, i)].
    Every block's replace gets this rank's share of the per-token arguments; the first block's also splits
    the stream, the last block's gathers it. What runs before the blocks (patch embedding, RoPE, time and
    text embeddings) and after them (head, unpatchify) runs whole on every rank."""
    blocks: str  # model attribute: the block list
    tokens: tuple[str, ...]  # replace-arguments split along dim 1; the first is the stream, gathered at the end
    # replace-arguments with one row for all tokens or one row per group of tokens (dim 1; e.g. per-frame
    # timestep modulation): the rows each token of this rank uses, as `repeat` ("module:function", the
    # model's own (rows, tokens) -> rows per token) deals them out
    modulation: tuple[str, ...] = ()
    repeat: str = ""
    patches: str = "dit"
    kind: str = "double_block"

    def repeat_fn(self):
        return _resolve(self.repeat)


@dataclasses.dataclass(frozen=True)
class Plan:
    family: str
    model_class: str  # "module:Class" of the diffusion model (patcher.model.diffusion_model)
    heads_attr: str  # attribute with the attention head count
    # Either an entry method that receives the token sequence (FLUX) ...
    entry: str | None = None  # method whose sequence inputs are split and whose output is gathered
    txt: tuple[str, str] | None = None  # entry arguments: text tokens, text position ids
    img: tuple[str, str] | None = None  # entry arguments: image tokens (+ reference tokens), image position ids
    control: str | None = None  # entry argument holding ControlNet residuals over the image tokens
    # ... or the seam around the blocks (Wan)
    seam: BlockSeam | None = None
    # submodules of each block (of `blocks`) whose attention keeps its keys and values whole: cross-attention
    # to the text (and CLIP image), which every rank holds in full; they run ComfyUI's own attention
    whole_keys: tuple[str, ...] = ()
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
    name: str = ""  # as the logs name the family ("FLUX", "Wan")

    def model_type(self) -> type | None:
        return _resolve(self.model_class)


def head_count(plan: Plan, model) -> int:
    return int(getattr(model, plan.heads_attr))


@functools.lru_cache(maxsize=None)
def _signature(cls) -> inspect.Signature:
    sig = inspect.signature(cls._forward)
    return sig.replace(parameters=list(sig.parameters.values())[1:])  # without self


def bind(model, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    return _signature(type(model)).bind(*args, **kwargs)
