"""Runs when ComfyUI imports this folder from custom_nodes/: read the environment, attach if enabled.

Never raises: a bad variable or a missing dependency logs one line and leaves ComfyUI unpatched.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("comfy_xdit_patch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_load():
    """Returns the Router when the plugin attached, else None."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    try:
        import comfy.model_management  # noqa: F401
    except ImportError:  # not inside ComfyUI (a tool importing this folder): nothing to attach to
        return None
    from comfy_xdit_patch import config as cfg

    try:
        gpus = cfg.visible_gpus()
        config = cfg.load(gpus=gpus)
    except cfg.ConfigError as e:
        log.error("comfy_xdit_patch: %s", e)
        return None
    if not config.enabled:
        log.info("comfy_xdit_patch: off (COMFY_XDIT=%s, %d GPU(s) visible)", os.environ.get("COMFY_XDIT", "unset"), gpus)
        return None
    try:
        import ray  # noqa: F401
        import wrapt  # noqa: F401
    except ImportError as e:
        log.error("comfy_xdit_patch: off, a dependency is missing (%s); run: python install.py", e)
        return None
    from comfy_xdit_patch import patch

    router = patch.install(config)
    if config.prestart:
        router.prestart()
    return router
