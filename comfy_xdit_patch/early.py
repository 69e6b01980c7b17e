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
(`preload`) as soon as it is up, while ComfyUI is still loading or idle, when its files are unchanged:
a restarted ComfyUI's first run of the same workflow finds the weights on the GPUs. The record also
keeps that run's first model call (its inputs, on the CPU: a few MB), which the early group runs once
after the load, so the compiled blocks are traced and their kernels loaded before the first prompt
too. Another model or resolution costs only its own load or compile.
"""
from __future__ import annotations

import importlib.util
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
        # the hooks' own checks (a missing one leaves the plugin off, and then no group may hold the GPUs),
        # without importing them here, on ComfyUI's main thread (ray: ~1 s)
        missing = [m for m in ("ray", "wrapt") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(f"{', '.join(missing)} not installed")
    except Exception as e:  # a bad setting or a missing dependency: the hooks say which, later
        log.debug("comfy_xdit_patch: no early start (%s: %s)", type(e).__name__, e)
        return False
    log.info("comfy_xdit_patch: starting %d %s ranks while ComfyUI loads", config.workers,
             "GPU" if config.use_gpu else "CPU")
    cancelled = threading.Event()

    def run():
        began = time.monotonic()
        deadline = began + config.start_timeout

        def reached(step):  # seconds from ComfyUI's prestartup (status: early_start; "done": ready or failed)
            _state["timeline"][step] = round(time.monotonic() - began, 3)

        try:
            cluster.init_ray(config)
            reached("ray")
            while "comfy.utils" not in sys.modules:  # ComfyUI imports torch right after its prestartup
                if cancelled.is_set() or time.monotonic() > deadline:
                    raise TimeoutError("ComfyUI did not go on loading")
                time.sleep(0.02)
            from .group import WorkerGroup

            group = _state["group"] = WorkerGroup(config)
            if cancelled.is_set():
                group.cancel()
            group.start()
            reached("group")
            record = _read_last(config, _state["wanted"], cancelled, deadline)
            if record is not None and not cancelled.is_set():
                preload(group, record, reached)
        except BaseException as e:
            _state["error"] = e
            if _state.get("group") is not None:
                _state["group"].shutdown()
        finally:
            reached("done")

    _state.update(config=config, cancelled=cancelled, wanted=threading.Event(), timeline={},
                  thread=threading.Thread(target=run, name="comfy-xdit-early", daemon=True))
    _state["thread"].start()
    return True


def _last_path(config) -> str:
    return os.path.join(os.path.expanduser(config.cache_dir), LAST)


def _write(config, record: dict) -> None:
    path = _last_path(config)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + f".{os.getpid()}.part", "wb") as f:
        pickle.dump(record, f)
    os.replace(path + f".{os.getpid()}.part", path)


def remember(spec, config) -> None:
    """After a routed run of a process that started early: its base model, for the next process. Never
    raises (the record is a convenience)."""
    if not _state or _state.get("remembered") == spec.base_key:
        return
    from .spec import base_only

    try:
        _state["record"] = {"spec": base_only(spec), "call": None}
        _write(config, _state["record"])
        _state["remembered"] = spec.base_key
    except Exception as e:
        log.debug("comfy_xdit_patch: the last model was not recorded (%s: %s)", type(e).__name__, e)


def remember_call(spec, config, world: int, family: str, mesh, chunks: int, call) -> None:
    """After the first routed call of the remembered model (once a process): that call, its tensors copied
    to the CPU, for the next process's group to run once ahead. Never raises."""
    record = _state.get("record")
    if record is None or record["call"] is not None or _state.get("remembered") != spec.base_key:
        return
    import torch
    from torch.utils import _pytree as pytree

    try:  # clone: a CPU tensor that views a larger one would be pickled with all of its storage
        args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().cpu().clone(), (call.args, call.kwargs))
        record["call"] = (world, family, mesh, chunks, args, kwargs)
        _write(config, record)
    except Exception as e:
        log.debug("comfy_xdit_patch: the last call was not recorded (%s: %s)", type(e).__name__, e)


class _NotImported(Exception):
    pass


class _Imported(pickle.Unpickler):
    """Resolves names only in modules already imported: the early thread never imports one of ComfyUI's
    (or a node pack's, like a GGUF loader) while ComfyUI itself may be importing it on its main thread."""

    def find_class(self, module, name):
        obj = sys.modules.get(module)
        try:
            for part in name.split("."):
                obj = getattr(obj, part)  # a module still being imported may lack it yet
        except AttributeError:
            obj = None
        if obj is None:
            raise _NotImported(f"{module}.{name}")
        return obj


def _read_last(config, wanted: threading.Event, cancelled: threading.Event, deadline: float):
    """The last run's record ({"spec", "call"}), once ComfyUI has imported what it names (its loader), or
    None: none recorded, unreadable (another version wrote it), or what it names never got imported by
    the time the first run wanted the group."""
    while True:
        last_try = wanted.is_set() or time.monotonic() > deadline  # want(): a run wants the group
        try:
            with open(_last_path(config), "rb") as f:
                record = _Imported(f).load()
            return record if isinstance(record, dict) and "spec" in record else None
        except _NotImported as e:
            if last_try or cancelled.is_set():
                log.info("comfy_xdit_patch: the last run's model was not loaded ahead (%s is not imported)", e)
                return None
            wanted.wait(0.1)
        except Exception:
            return None


def preload(group, record: dict, reached=lambda step: None) -> None:
    """Load the model the last process used, then run its first call once; a failure that leaves the group
    healthy is logged and forgotten: the model can't be loaded, or its files changed or are gone since
    (each rank checks the spec's file stamps before it loads, as for any run, and refuses), or the call
    is refused. NOTE: not interruptible: ComfyUI's interrupt is meant for a prompt, which this is not."""
    from .errors import Unroutable, WorkerFailed

    spec, t0 = record["spec"], time.perf_counter()
    try:
        group.prepare(spec, interruptible=False)
    except (Unroutable, WorkerFailed) as e:  # a rank refused or raised, and serves on (else: raised)
        log.info("comfy_xdit_patch: the last run's model was not loaded ahead (%s)", e)
        return
    _state["preloaded"] = spec.base_key
    reached("model")
    log.info("comfy_xdit_patch: loaded the last run's model ahead on %d ranks in %.1f s", group.world,
             time.perf_counter() - t0)
    if record.get("call") is None or record["call"][0] != group.world:
        return
    _, family, mesh, chunks, args, kwargs = record["call"]
    t0 = time.perf_counter()
    try:
        group.call(spec.key, family, mesh, chunks, args, kwargs, timeout=group.config.load_timeout, interruptible=False)
    except (Unroutable, WorkerFailed) as e:
        log.info("comfy_xdit_patch: the last run's first call did not run ahead (%s)", e)
        return
    reached("compiled")
    log.info("comfy_xdit_patch: ran the last run's first call ahead (%s) in %.1f s", mesh, time.perf_counter() - t0)


def want() -> None:
    """A FLUX run waits for the group: the last model's record is read now or never (a run comes after every
    node pack has loaded, so a module it names that is not imported yet never will be)."""
    if _state:
        _state["wanted"].set()


def preloaded() -> bool:
    return "preloaded" in _state


def timeline() -> dict | None:
    """When the early start reached each step (seconds from ComfyUI's prestartup), if there was one."""
    return dict(_state["timeline"]) if _state else None


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
        """The group, ready, with the last run's model loaded ahead where there is one (a load under way
        is waited for: the run would wait for its own)."""
        self._state["thread"].join()  # bounded: the start keeps its deadline, a load its timeout, a cancel ends it
        if "error" in self._state:
            raise self._state["error"]
        return self._state["group"]

    def cancel(self) -> None:
        self._state["cancelled"].set()
        group = self._state.get("group")
        if group is not None:
            group.cancel()

    def shutdown(self) -> None:
        group = self._state.get("group")
        if group is not None:
            group.shutdown()
