"""The worker group started while ComfyUI is still loading (its custom nodes' prestartup seam).

ComfyUI runs each custom node's `prestartup_script.py` before it imports torch, its own modules and
its nodes (~15 s on a GPU machine). Started from there, Ray and the ranks (each a process that
imports torch and ComfyUI: 18-20 s on an H200) overlap that, instead of beginning when the plugin's
hooks attach. Nothing here imports torch before ComfyUI does (ComfyUI warns about that): the settings
are read with the driver's GPU count (`config.gpus_from_driver`), Ray starts at once (cluster.py, no
torch), and the group itself is built once ComfyUI has imported torch.
The Router adopts the group (`take`) when its settings are the ones it was started with; otherwise
it is cancelled and the Router starts its own, as without this.

A process that started early also records the base model (file and loader, no LoRA) of its last
routed run under COMFY_XDIT_CACHE_DIR (`remember`); the next one's early group loads that model ahead
(`preload`) when its files are unchanged, so a restarted ComfyUI's first run of the same workflow
finds the weights on the GPUs. Another model costs only that load (the ranks keep one base model).
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import time

log = logging.getLogger("comfy_xdit_patch")

_state: dict = {}  # the one early start of this process: "config", "thread", "group", "error", ...
LAST = "last_model.pkl"  # under COMFY_XDIT_CACHE_DIR


def start() -> bool:
    """Start the worker group in the background if the plugin is on and asked to start ahead. Never
    raises (a problem leaves the start to the Router, which reports it). True if a start is under way."""
    if _state:
        return True
    try:
        from . import cluster
        from . import config as cfgmod

        config = cfgmod.load(gpus=cfgmod.gpus_from_driver())
        if not (config.enabled and config.prestart):
            return False
        import ray  # noqa: F401  (the hooks' own checks: a missing one leaves the plugin off, and then no
        import wrapt  # noqa: F401  group may hold the GPUs)
    except Exception as e:  # a bad setting or a missing dependency: the hooks say which, later
        log.debug("comfy_xdit_patch: no early start (%s: %s)", type(e).__name__, e)
        return False
    log.info("comfy_xdit_patch: starting %d %s ranks while ComfyUI loads", config.workers,
             "GPU" if config.use_gpu else "CPU")
    cancelled = threading.Event()

    def run():
        deadline = time.monotonic() + config.start_timeout
        try:
            cluster.init_ray(config)
            while "comfy.utils" not in sys.modules:  # ComfyUI imports torch right after its prestartup
                if cancelled.is_set() or time.monotonic() > deadline:
                    raise TimeoutError("ComfyUI did not go on loading")
                time.sleep(0.02)
            from .group import WorkerGroup

            group = _state["group"] = WorkerGroup(config)
            if cancelled.is_set():
                group.cancel()
            group.start()
        except BaseException as e:
            _state["error"] = e
            if _state.get("group") is not None:
                _state["group"].shutdown()

    _state.update(config=config, cancelled=cancelled,
                  thread=threading.Thread(target=run, name="comfy-xdit-early", daemon=True))
    _state["thread"].start()
    return True


def _last_path(config) -> str:
    return os.path.join(os.path.expanduser(config.cache_dir), LAST)


def remember(spec, config) -> None:
    """After a routed run of a process that started early: its base model, for the next process. Never
    raises (the record is a convenience)."""
    if not _state or _state.get("remembered") == spec.base_key:
        return
    from .spec import base_only

    path = _last_path(config)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + f".{os.getpid()}.part", "wb") as f:
            pickle.dump(base_only(spec), f)
        os.replace(path + f".{os.getpid()}.part", path)
        _state["remembered"] = spec.base_key
    except Exception as e:
        log.debug("comfy_xdit_patch: the last model was not recorded (%s: %s)", type(e).__name__, e)


def preload(group, config) -> None:
    """Load the model the last process used; a failure that leaves the group healthy is logged and
    forgotten: the model can't be loaded, or its files changed or are gone since (each rank checks the
    spec's file stamps before it loads, as for any run, and refuses)."""
    from .errors import Unroutable, WorkerFailed

    try:
        with open(_last_path(config), "rb") as f:
            spec = pickle.load(f)
    except Exception:  # none recorded, or unreadable (another version wrote it)
        return
    t0 = time.perf_counter()
    try:
        group.prepare(spec)
    except (Unroutable, WorkerFailed) as e:  # a rank refused or raised, and serves on (else: raised)
        log.info("comfy_xdit_patch: the last run's model was not loaded ahead (%s)", e)
        return
    _state["preloaded"] = spec.base_key
    log.info("comfy_xdit_patch: loaded the last run's model ahead on %d ranks in %.1f s", group.world,
             time.perf_counter() - t0)


def preloaded() -> bool:
    return "preloaded" in _state


def take(config):
    """The start begun at ComfyUI's start, for a Router with `config` (once; None if there is none or it
    was begun with other settings, which is then cancelled)."""
    if not _state or _state.get("taken"):
        return None
    _state["taken"] = True
    started = _Started(_state)
    if _state["config"] != config:
        log.info("comfy_xdit_patch: the settings differ from those at ComfyUI's start; the group started then "
                 "is replaced")
        started.cancel()  # its own thread shuts it down
        return None
    return started


class _Started:
    """What the Router holds while the early start finishes: wait() for the group, or cancel()."""

    def __init__(self, state: dict):
        self._state = state

    def wait(self):
        """The group, ready, with the last run's model loaded ahead where there is one. NOTE: called by the
        Router (after ComfyUI has imported its modules): reading the record imports the loader's module,
        which on the early thread could race ComfyUI's own imports."""
        self._state["thread"].join()  # bounded: the start keeps its deadline, and a cancel ends it
        if "error" in self._state:
            raise self._state["error"]
        group = self._state["group"]
        preload(group, self._state["config"])
        return group

    def cancel(self) -> None:
        self._state["cancelled"].set()
        group = self._state.get("group")
        if group is not None:
            group.cancel()

    def shutdown(self) -> None:
        group = self._state.get("group")
        if group is not None:
            group.shutdown()
