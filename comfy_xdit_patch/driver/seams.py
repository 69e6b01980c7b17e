"""The ComfyUI functions and attributes the plugin hooks into, checked before anything is attached.

A ComfyUI without one of them (an older release, or a newer one that renamed it) is left exactly as
shipped: `patch.install` raises `Missing`, and the start-up hook logs one line naming what is missing.
The oldest release that has them all is OLDEST (docs/versions.md: the releases tested, and why each
older one steps aside).
"""
from __future__ import annotations

import importlib
import inspect

OLDEST = "v0.23.0"


class Missing(RuntimeError):
    """This ComfyUI lacks seams the plugin needs; nothing was attached."""

    def __init__(self, seams: list[str]):
        self.seams = seams
        super().__init__(f"this ComfyUI lacks {', '.join(seams)} (comfy_xdit_patch needs ComfyUI {OLDEST} or newer)")


def _attr(module: str, path: str):
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _takes(module: str, path: str, parameter: str) -> bool:
    return parameter in inspect.signature(_attr(module, path)).parameters


def _sets(module: str, cls: str, attribute: str) -> bool:
    """Whether cls.__init__ assigns self.<attribute> (an instance attribute, absent from the class)."""
    return attribute in _attr(module, f"{cls}.__init__").__code__.co_names


def _has(name: str):
    """An attribute named "module.path:attribute.path"."""
    module, _, path = name.partition(":")
    return _attr(module, path)


# (what the log line names, how to tell it is there)
SEAMS = (
    ("comfy.patcher_extension.WrappersMP.OUTER_SAMPLE/SAMPLER_SAMPLE/DIFFUSION_MODEL",
     lambda: all(_has(f"comfy.patcher_extension:WrappersMP.{k}") for k in ("OUTER_SAMPLE", "SAMPLER_SAMPLE",
                                                                              "DIFFUSION_MODEL"))),
    ("comfy.patcher_extension.add_wrapper_with_key", lambda: _has("comfy.patcher_extension:add_wrapper_with_key")),
    ("comfy.samplers.CFGGuider.sample", lambda: _has("comfy.samplers:CFGGuider.sample")),
    ("comfy.model_patcher.create_model_options_clone", lambda: _has("comfy.model_patcher:create_model_options_clone")),
    ("comfy.model_management.load_models_gpu", lambda: _has("comfy.model_management:load_models_gpu")),
    ("comfy.model_management.unload_model_and_clones", lambda: _has("comfy.model_management:unload_model_and_clones")),
    ("ModelPatcher.cached_patcher_init", lambda: _sets("comfy.model_patcher", "ModelPatcher", "cached_patcher_init")),
    ("execution.get_output_data(v3_data=)", lambda: _takes("execution", "get_output_data", "v3_data")),
    ("comfy.sd.VAE.decode", lambda: _has("comfy.sd:VAE.decode")),
    ("transformer_options['optimized_attention_override']",
     lambda: _has("comfy.ldm.modules.attention:wrap_attn") and _takes("comfy.ldm.flux.math", "attention",
                                                                      "transformer_options")),
)


def missing() -> list[str]:
    """The seams this ComfyUI lacks, in SEAMS order; [] when it has them all."""
    lacking = []
    for name, present in SEAMS:
        try:
            ok = bool(present())
        except Exception:  # a check that fails to run: that seam is not usable either
            ok = False
        if not ok:
            lacking.append(name)
    return lacking
