"""The one chokepoint that attaches the plugin to ComfyUI and takes it off again.

wrapt wrappers: `comfy.samplers.CFGGuider.sample` (to register our ComfyUI wrappers on a sampling run
of a routed family) and `comfy.model_management.load_models_gpu` (so a routed model's weights stay off this
process's GPU), both delegating to the Router; `execution.get_output_data` (models.record: which
loader node made a model that has no recipe); `comfy.sd.VAE.decode` (decode.VaeDecode: a large decode shared
out among the ranks by rows). uninstall() puts back the exact originals.
"""
from __future__ import annotations

import atexit
import logging
import threading

import wrapt

from ..config import Config

log = logging.getLogger("comfy_xdit_patch")

# (module, attribute path) -> router method name, or a handler of its own
_TARGETS = (
    ("comfy.samplers", "CFGGuider.sample", "sample"),
    ("comfy.model_management", "load_models_gpu", "load_models_gpu"),
    ("execution", "get_output_data", "models.record"),  # which loader node made a model without a recipe
    ("comfy.sd", "VAE.decode", "decode.VaeDecode"),  # a large VAE decode on the ranks
)

_lock = threading.Lock()
_originals: list[tuple[object, str, object]] = []  # (owner, attribute, original as stored on the owner)
_router = None
_exit_hook = [False]


def _at_exit() -> None:
    if _router is not None:
        _router.close_group()


def _owner(module_name: str, path: str):
    import importlib

    owner = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, attr


def install(config: Config, router=None):
    """Attach to ComfyUI (idempotent). Returns the Router; pass one back to reuse its worker group.
    Raises seams.Missing, attaching nothing, on a ComfyUI that lacks what the plugin hooks into."""
    global _router
    from . import seams

    with _lock:
        if _router is not None:
            return _router
        lacking = seams.missing()
        if lacking:
            raise seams.Missing(lacking)
        from .router import Router  # after the check: it imports ComfyUI modules an old ComfyUI lacks

        router = router or Router(config, on_disable=uninstall)
        for module_name, path, method in _TARGETS:
            owner, attr = _owner(module_name, path)
            _originals.append((owner, attr, owner.__dict__[attr]))
            if method == "models.record":
                from . import models

                handler = models.record
            elif method == "decode.VaeDecode":
                from .decode import VaeDecode

                handler = VaeDecode(router)
            else:
                handler = getattr(router, method)
            wrapt.wrap_function_wrapper(owner, attr, lambda wrapped, instance, args, kwargs, h=handler:
                                        h(wrapped, instance, args, kwargs))
        _router = router
        if not _exit_hook[0]:
            atexit.register(_at_exit)  # the worker group is torn down when ComfyUI exits
            _exit_hook[0] = True
        from .. import plans

        log.info("comfy_xdit_patch: routing %s to %d %s rank(s)", plans.routed(), config.workers,
                 "GPU" if config.use_gpu else "CPU")
        return router


def uninstall(close_group: bool = True):
    """Detach from ComfyUI: restore the original functions; shut the worker group down unless told not
    to (a side-by-side benchmark or test reattaches the same Router). Returns the detached Router."""
    global _router
    with _lock:
        while _originals:
            owner, attr, original = _originals.pop()
            setattr(owner, attr, original)
        router, _router = _router, None
    if router is not None and close_group:
        router.close_group()
    return router


def installed() -> bool:
    return _router is not None


def router():
    return _router
