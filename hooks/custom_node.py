"""Runs when ComfyUI imports this folder from custom_nodes/: read the environment, attach if enabled.

Never raises: a bad variable or a missing dependency logs one line and leaves ComfyUI unpatched.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("comfy_xdit_patch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANOTHER_COPY = "another copy serves"  # on_load's answer in a second copy of the plugin


def on_load(here: str = ROOT):
    """Returns the Router when the plugin attached, ANOTHER_COPY when a copy loaded before this one (another
    folder in custom_nodes/) serves, else None."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    try:
        import comfy.model_management  # noqa: F401
    except ImportError:  # not inside ComfyUI (a tool importing this folder): nothing to attach to
        return None
    import comfy_xdit_patch

    # NOTE: one plugin per process. Two copies (a Manager install beside a git clone) would register the
    # status route twice, which stops ComfyUI's server from starting, and patch ComfyUI twice.
    first = getattr(comfy_xdit_patch, "loaded_from", None)
    if first is not None:
        log.warning("comfy_xdit_patch: already loaded from %s; this copy (%s) does nothing. Remove one of them "
                    "from custom_nodes/", first, here)
        return ANOTHER_COPY
    comfy_xdit_patch.loaded_from = here
    from comfy_xdit_patch.driver import status

    _serve_status(status)  # also when off: the panel then says why
    return _attach(status)


def _serve_status(status) -> None:
    """`GET /xdit/status` and the status event on ComfyUI's own server, when there is one."""
    server = sys.modules.get("server")  # ComfyUI's main.py imported it; a test or tool may not have
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return
    try:
        status.serve(instance)
    except Exception as e:  # the plugin works without its status page
        log.warning("comfy_xdit_patch: no status page (%s: %s)", type(e).__name__, e)


def _drop_early_start(config) -> None:
    """The worker group prestartup_script.py began, if any, is cancelled, and the private Ray started with it
    shut down once that start has ended (in the background: ComfyUI goes on loading)."""
    import threading

    from comfy_xdit_patch.driver import prestart as early
    from comfy_xdit_patch.group import cluster

    started = early.take(config)
    if started is None:
        return
    started.cancel()

    def stop():
        try:
            started.wait()
        except BaseException:  # the cancel itself, or the start's own failure: nothing to report
            pass
        started.shutdown()
        if cluster.started_here():
            import ray

            ray.shutdown()

    threading.Thread(target=stop, name="comfy-xdit-stop", daemon=True).start()


def _attach(status):
    from comfy_xdit_patch import config as cfg

    try:
        gpus = cfg.visible_gpus()
        config = cfg.load(gpus=gpus)
    except cfg.ConfigError as e:
        log.error("comfy_xdit_patch: %s", e)
        return status.plugin_off(str(e))
    if not config.enabled:
        log.info("comfy_xdit_patch: off (COMFY_XDIT=%s, %d GPU(s) visible)", os.environ.get("COMFY_XDIT", "unset"), gpus)
        why = (f"COMFY_XDIT={os.environ['COMFY_XDIT']}" if os.environ.get("COMFY_XDIT") else
               f"COMFY_XDIT is unset and {gpus} GPU(s) are visible (on by default with 2 or more; set "
               "COMFY_XDIT=1 to use CPU ranks)")
        return status.plugin_off(why, config)
    try:
        import ray  # noqa: F401
        import wrapt  # noqa: F401
    except ImportError as e:
        log.error("comfy_xdit_patch: off, a dependency is missing (%s); run: python install.py", e)
        return status.plugin_off(f"a dependency is missing ({e}); run: python install.py", config)
    from comfy_xdit_patch.driver import seams
    from comfy_xdit_patch.driver import patch

    try:
        router = patch.install(config)
    except seams.Missing as e:  # an older (or changed) ComfyUI: nothing attached, it runs as shipped
        log.warning("comfy_xdit_patch: off, %s; ComfyUI runs as without the plugin", e)
        _drop_early_start(config)
        return status.plugin_off(str(e), config)
    status.attach(router)
    if config.prestart:
        router.prestart()
    return router
