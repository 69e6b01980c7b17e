"""The worker group started while ComfyUI is still loading (its custom nodes' prestartup seam).

ComfyUI runs each custom node's `prestartup_script.py` before it imports torch, its own modules and
its nodes (~15 s on a GPU machine). Started from there, Ray and the ranks (each a process that
imports torch and ComfyUI: 18-20 s on an H200) overlap that, instead of beginning when the plugin's
hooks attach. Nothing here imports torch before ComfyUI does (ComfyUI warns about that): the settings
are read with the driver's GPU count (`config.gpus_from_driver`), Ray starts at once (cluster.py, no
torch), and the group itself is built once ComfyUI has imported torch. Once it is up, the last
process's model is loaded ahead and its first call run once (last_run.py).
The Router adopts the start (`take`) when its settings are the ones it was begun with; otherwise it
is cancelled and the Router starts its own group, as without this.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
import threading
import time

from ..config import Config
from ..errors import Cancelled
from ..timing import Laps
from . import last_run

log = logging.getLogger("comfy_xdit_patch")


@dataclasses.dataclass
class EarlyStart:
    """The one early start of this process: what the Router holds while it finishes (wait() or cancel())."""
    config: Config
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    wanted: threading.Event = dataclasses.field(default_factory=threading.Event)  # a run wants the group
    timeline: dict = dataclasses.field(default_factory=dict)  # step -> seconds from ComfyUI's prestartup
    thread: threading.Thread | None = None
    group: object = None  # the WorkerGroup, once made
    error: BaseException | None = None
    taken: bool = False
    preloaded: bool = False  # the last run's model was loaded ahead

    def run(self) -> None:
        reached = Laps(cumulative=True, clock=time.monotonic)  # "done": ready or failed
        self.timeline = reached.seconds
        deadline = reached.began + self.config.start_timeout

        try:
            from ..group import cluster

            cluster.init_ray(self.config)
            reached("ray")
            while "comfy.utils" not in sys.modules:  # ComfyUI imports torch right after its prestartup
                if self.cancelled.is_set() or time.monotonic() > deadline:
                    raise TimeoutError("ComfyUI did not go on loading")
                time.sleep(0.02)
            from ..group.workers import WorkerGroup

            group = self.group = WorkerGroup(self.config)
            if self.cancelled.is_set():
                group.cancel()
            group.start()
            reached("group")
            record = last_run.read(self.config, self.wanted, self.cancelled, deadline)
            if record is not None and not self.cancelled.is_set():
                self.preloaded = last_run.preload(group, record, reached)
            if self.cancelled.is_set():  # NOTE: cancelled after the group was up: nobody else shuts it down
                raise Cancelled("the worker group started early was replaced")
        except BaseException as e:
            self.error = e
            if self.group is not None:
                self.group.shutdown()
        finally:
            reached("done")

    def wait(self):
        """The group, ready, with the last run's model loaded ahead where there is one (a load under way
        is waited for: the run would wait for its own)."""
        self.thread.join()  # bounded: the start keeps its deadline, a load its timeout, a cancel ends it
        if self.error is not None:
            raise self.error
        return self.group

    def cancel(self) -> None:
        self.cancelled.set()
        if self.group is not None:
            self.group.cancel()

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()


_early: EarlyStart | None = None


def start() -> bool:
    """Start the worker group in the background if the plugin is on and asked to start ahead. Never
    raises (a problem leaves the start to the Router, which reports it). True if a start is under way."""
    global _early
    if _early is not None:
        return True
    try:
        from .. import config as cfgmod

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
    early = _early = EarlyStart(config)
    if config.remember_last:
        last_run.record_for(config)
    early.thread = threading.Thread(target=early.run, name="comfy-xdit-early", daemon=True)
    early.thread.start()
    return True


def want() -> None:
    """A FLUX run waits for the group: the last model's record is read now or never (a run comes after every
    node pack has loaded, so a module it names that is not imported yet never will be)."""
    if _early is not None:
        _early.wanted.set()


def timeline() -> dict | None:
    """When the early start reached each step (seconds from ComfyUI's prestartup), if there was one."""
    return dict(_early.timeline) if _early is not None else None


def take(config: Config) -> EarlyStart | None:
    """The start begun at ComfyUI's start, for a Router with `config` (once; None if there is none or it
    was begun with other settings, which is then cancelled)."""
    early = _early
    if early is None or early.taken:
        return None
    early.taken = True
    if early.config != config:
        log.info("comfy_xdit_patch: the settings differ from those at ComfyUI's start; the group started then "
                 "is replaced")
        early.cancel()  # its own thread shuts it down, or, where that thread has ended already, this
        if early.thread is not None and not early.thread.is_alive() and early.error is None:
            early.error = Cancelled("the worker group started early was replaced")
            early.shutdown()
        return None
    return early
