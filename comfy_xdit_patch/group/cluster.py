"""Ray for the worker group: a private loopback-only cluster started by this process, or an existing
cluster joined by address. Imports neither torch nor ComfyUI, so it can run at ComfyUI's prestartup
(driver/prestart.py), before ComfyUI has imported them.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading

from ..config import Config
from ..errors import ClusterUnreachable
from ..locate import CHECKOUT
from . import join, lifecycle

log = logging.getLogger("comfy_xdit_patch.group")

_NOSET = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def comfy_root() -> str:
    import folder_paths  # ComfyUI's own top-level module (imports no torch: usable at its prestartup)

    return os.path.dirname(os.path.abspath(folder_paths.__file__))


def rank_env() -> dict:
    """Environment the ranks start with, over the one they inherit from ComfyUI's process. ComfyUI's main.py
    asks for torch's cudaMallocAsync allocator (PYTORCH_CUDA_ALLOC_CONF); under it, capturing a call of the
    compiled blocks as a CUDA graph aborts the rank ("uncaptured free of a captured allocation", 1x H200),
    so the ranks get torch's own caching allocator, with any other allocator option kept."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    # NOTE: read when a process first uses CUDA, so it must be set before the rank's process starts
    kept = [p for p in conf.split(",") if p.strip() and not p.strip().startswith("backend:")]
    return {"PYTORCH_CUDA_ALLOC_CONF": ",".join(kept)}


def started_here() -> bool:
    """Whether Ray, as this process is connected to it now, is the private cluster _start_ray started (its
    workers, and so every rank, start with rank_env() and the path to this plugin and ComfyUI)."""
    node = lifecycle._node()
    return node is not None and _STARTED.get("session") == node.session_name


_STARTED: dict = {}  # "session": the Ray session _start_ray started


def _worker_path() -> str:
    parts = [CHECKOUT, comfy_root()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


def init_ray(config: Config) -> None:
    """Start or join Ray, once per process. A private cluster starts on a thread of ours that lives as long as
    the process: Ray's own processes (GCS, raylet) die with the THREAD that started them (Linux's parent-death
    signal), and the caller may be a short-lived one (the prestart thread). A joined one starts no process:
    joining is bounded by COMFY_XDIT_START_TIMEOUT whatever its head does (group/join.py), and raises
    ClusterUnreachable with the cause."""
    ray = sys.modules.get("ray")  # NOTE: not imported here; _start_ray sets its environment first
    if ray is not None and ray.is_initialized():
        lost = lifecycle.ray_lost(not config.ray_address)
        if lost is None:
            return
        log.warning("comfy_xdit_patch: %s", lost)
        lifecycle.restart_ray()  # the thread that kept the old cluster's processes waits on, harmlessly
    if config.ray_address:
        _join(config)
        return
    done, error = threading.Event(), []

    def keep():
        try:
            _start_ray(config)
        except BaseException as e:  # handed to the caller
            error.append(e)
        done.set()
        if not error:
            threading.Event().wait()  # never returns: Ray's processes share this thread's fate

    threading.Thread(target=keep, name="comfy-xdit-ray", daemon=True).start()
    done.wait()
    if error:
        raise error[0]


def _join(config: Config) -> None:
    import ray

    cause = join.join(config.ray_address, config.start_timeout, log_to_driver=False,
                      runtime_env={"env_vars": {"PYTHONPATH": _worker_path(), _NOSET: "1"}})
    if cause is not None:
        raise ClusterUnreachable(cause)
    atexit.register(ray.shutdown)


def _start_ray(config: Config) -> None:
    """Start the private cluster; stop it at exit."""
    # NOTE: Ray otherwise advertises, and binds its gRPC servers to, the machine's external address;
    # in single-node mode it uses loopback. Set before ray is imported (its child processes read it)
    # and on the constant itself in case another node pack imported ray first.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return
    atexit.register(ray.shutdown)
    os.environ["PYTHONPATH"] = _worker_path()  # the raylet, and so every worker, inherits it
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    # CPU ranks mostly wait on each other; room for a second group (a restart beside a dying one)
    resources = {"num_cpus": max(os.cpu_count() or 1, 2 * config.workers)}
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if config.use_gpu and config.devices:
        visible = saved.split(",") if saved else [str(i) for i in range(config.gpus)]
        # NOTE: Ray hands each actor one of the GPUs it was started with; start it with only these.
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] for i in config.devices)
    resources["num_gpus"] = len(config.devices or ()) or config.gpus
    # NOTE: ranks see every GPU Ray was started with and pick their own (worker.py): peer copies
    # between ranks need each other's GPUs visible. The raylet, and so every worker, inherits this.
    os.environ[_NOSET] = "1"
    saved_alloc = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    os.environ.update(rank_env())  # NOTE: the raylet's workers, which Ray starts ahead, inherit it too
    try:
        ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1", **resources)
        _STARTED["session"] = lifecycle._node().session_name
    finally:
        os.environ.pop(_NOSET, None)
        for name, value in (("CUDA_VISIBLE_DEVICES", saved), ("PYTORCH_CUDA_ALLOC_CONF", saved_alloc)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
