"""The worker group's life, as ComfyUI's process sees it: started on demand (or adopted from the start
ComfyUI's own start began, prestart.py), its private Ray watched between runs, closed, and restarted
after a transient failure within a budget. The Router asks it for a group (`get`); it tells the Router's
status of each transition through `tell(state, detail)`.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from ..config import Config
from ..errors import ClusterUnreachable
from ..group import lifecycle
from . import prestart

log = logging.getLogger("comfy_xdit_patch")

MAX_RESTARTS = 2  # consecutive runs with a transient failure that restart the group; the next unpatches
MAX_RETRY = 600.0  # seconds between tries to join a cluster that could not be joined, at most
WATCH_SECONDS = 2.0  # how often an idle group's private Ray is checked (_watch)


class GroupLife:
    def __init__(self, config: Config, tell: Callable[[str, str], None]):
        self.config = config
        self.group = None  # the WorkerGroup in use, once started
        self.starting = None  # a WorkerGroup or prestart.EarlyStart being started, to cancel on close
        self.restarts = 0  # consecutive runs that failed transiently (the budget's count)
        self.starts = 0
        self.sampling = 0  # sampling runs under way: the watch leaves the group to them
        self.unreachable: str | None = None  # why the Ray cluster at COMFY_XDIT_RAY_ADDRESS could not be joined
        self.next_try: float | None = None  # when a run may try to join it again (time.time())
        self._retry = config.join_retry
        self._tell = tell
        self._lock = threading.RLock()

    def get(self):
        """The group, started (or the early start adopted) if there is none; raises its start's error."""
        with self._lock:
            if self.group is not None and lifecycle.ray_lost(self.group.private):  # e.g. GCS gone, ranks still up
                self.close()
            if self.group is None and self.next_try is not None and time.time() < self.next_try:
                raise ClusterUnreachable(f"{self.unreachable} (next try in {self.next_try - time.time():.0f} s)")
            if self.group is None:
                from ..group.workers import WorkerGroup

                ahead = prestart.take(self.config)  # the start ComfyUI's own start began (prestartup_script.py)
                starting = self.starting = ahead or WorkerGroup(self.config)
                self._tell("starting", f"starting {self.config.workers} {'GPU' if self.config.use_gpu else 'CPU'} ranks")
                try:
                    group = ahead.wait() if ahead else starting.start()
                except ClusterUnreachable as e:
                    starting.shutdown()
                    self._unreachable(str(e))
                    raise
                except BaseException as e:
                    starting.shutdown()
                    self._tell("idle", f"the worker group did not start: {type(e).__name__}: {e}")
                    raise
                finally:
                    self.starting = None
                self.group = group
                self.starts += 1
                self.unreachable = self.next_try = None
                self._retry = self.config.join_retry
                if group.private:
                    threading.Thread(target=self._watch, args=(group,), name="comfy-xdit-watch", daemon=True).start()
                preloaded = ahead is not None and ahead.preloaded
                self._tell("ready", f"{group.world} ranks up, " + ("the last run's model loaded ahead" if preloaded
                                                                   else "no model loaded yet"))
            return self.group

    def prestart(self) -> threading.Thread:
        """Start the group in the background (at ComfyUI's start), so that the first FLUX run finds it ready
        instead of waiting for Ray and the ranks. A failure is logged; that run tries again."""

        def run():
            try:
                self.get()
            except ClusterUnreachable:  # said, and shown as broken, with the next try
                pass
            except Exception as e:
                self._tell("idle", f"starting ahead failed ({type(e).__name__}: {e}); the first FLUX run tries again")
                log.warning("comfy_xdit_patch: starting the worker group ahead failed (%s: %s); the first FLUX "
                            "run will try again", type(e).__name__, e)

        thread = threading.Thread(target=run, name="comfy-xdit-prestart", daemon=True)
        thread.start()
        return thread

    def _unreachable(self, cause: str) -> None:
        """The cluster at COMFY_XDIT_RAY_ADDRESS could not be joined: runs stay in ComfyUI's process until the next
        try, after a back-off that doubles with each failed try (a cluster started later is joined then)."""
        self.unreachable, self.next_try = cause, time.time() + self._retry
        when = time.strftime("%H:%M:%S", time.localtime(self.next_try))
        log.warning("comfy_xdit_patch: can't join the Ray cluster at %s: %s (FLUX runs in ComfyUI's process; the "
                    "next try is at %s)", self.config.ray_address, cause, when)
        self._retry = min(2 * self._retry, MAX_RETRY)
        self._tell("broken", f"can't join the Ray cluster at {self.config.ray_address}: {cause}")

    def _watch(self, group) -> None:
        """While `group` is in use: when the private cluster's GCS dies between runs, close the group at once.
        Ray's driver thread that polls the GCS then spins (a core of ComfyUI's process, for as long as no FLUX
        run comes to notice); closing the group shuts Ray down, and the next run starts both again."""
        while self.group is group:
            time.sleep(WATCH_SECONDS)
            if self.sampling or lifecycle.ray_lost(True, kinds=("gcs_server",)) is None:
                continue  # a run's own calls check (WorkerGroup.check_ray)
            if not self._lock.acquire(blocking=False):  # a run is starting or preparing: it sees the loss itself
                continue
            try:
                if self.group is group and not self.sampling:
                    log.warning("comfy_xdit_patch: Ray's GCS died between runs; the worker group is closed, and "
                                "the next FLUX run starts Ray and a group again")
                    self.close()
                    self._tell("idle", "the worker group was shut down; the next FLUX run starts one")
            finally:
                self._lock.release()

    def close(self) -> bool:
        """Tear the group down; returns once its ranks are gone and Ray released their placement (whether
        there was a group). NOTE: a group still starting (prestart thread, or a run) holds the lock: it is
        cancelled (its ranks killed by handle), its starting thread shuts it down and releases the lock
        within a fraction of a second, or when Ray's own start-up (not interruptible) returns."""
        starting = self.starting
        if starting is not None:
            starting.cancel()
        bound = self.config.start_timeout + 10
        if not self._lock.acquire(timeout=bound):
            log.error("comfy_xdit_patch: the starting worker group did not stop within %.0fs; it was cancelled "
                      "and is shut down by its own thread", bound)
            return False
        try:
            group, self.group = self.group, None
            if group is not None:
                group.shutdown()
        finally:
            self._lock.release()
        return group is not None

    def may_restart(self) -> bool:
        """A run failed transiently and its group was closed: whether the next run may start a new one (the
        budget), counting this restart."""
        if self.restarts >= MAX_RESTARTS:
            return False
        self.restarts += 1
        return True
