"""Facts about a worker group's processes that the failure path needs, read from Ray and /proc:

- whether a rank's process is gone (so that a peer's collective error is known as the fallout of a death,
  not an error that would repeat);
- whether the private Ray cluster's own processes (GCS, raylet) are gone (the next group starts Ray again);
- the last lines of a dead rank's own log (why it died: a signal, OOM, a CUDA error), for ComfyUI's log;
- whether Ray has released a removed placement group's bundles (the next group can be placed).
"""
from __future__ import annotations

import glob
import logging
import os
import time

log = logging.getLogger(__name__)


def process_gone(pid: int) -> bool:
    """The process exited (or is a zombie nobody reaped yet). Ranks on this host only."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _node():
    import ray._private.worker as ray_worker

    return getattr(ray_worker, "_global_node", None)


def ray_lost(private: bool, kinds: tuple = ()) -> str | None:
    """Which of the private cluster's own processes died, if any (None: all there, or not ours to watch).
    kinds: only these (e.g. ("gcs_server",)); default all."""
    if not private:
        return None
    try:
        import ray

        if not ray.is_initialized():
            return None
        node = _node()
        dead = node.dead_processes() if node is not None else []
    except Exception as e:  # a half-torn-down Ray counts as lost
        return f"Ray's state is unreadable ({type(e).__name__}: {e})"
    dead = [(kind, p) for kind, p in dead if not kinds or kind in kinds]
    if not dead:
        return None
    return "Ray's " + ", ".join(sorted({kind for kind, _ in dead})) + " died"


def restart_ray() -> None:
    """Disconnect from (and, for the private cluster, stop) Ray; the next group's start connects again."""
    try:
        import ray

        ray.shutdown()
        log.warning("comfy_xdit_patch: Ray was shut down; the next worker group starts it again")
    except Exception as e:
        log.warning("comfy_xdit_patch: shutting Ray down failed (%s: %s)", type(e).__name__, e)


def log_tail(pid: int, lines: int = 15) -> str:
    """The last lines of rank `pid`'s own stdout/stderr files in Ray's session logs ('' if none)."""
    try:
        node = _node()
        logs = node.get_logs_dir_path() if node is not None else None
    except Exception:
        logs = None
    if not logs:
        return ""
    out = []
    for path in sorted(glob.glob(os.path.join(logs, f"worker-*-{pid}.err")) +
                       glob.glob(os.path.join(logs, f"worker-*-{pid}.out"))):
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode(errors="replace").splitlines()
        except OSError:
            continue
        # Ray's own markers (task names) say nothing about why a rank died
        text = [t for t in text if t.strip() and not t.startswith(":") and "::" not in t[:12]][-lines:]
        if text:
            out.append(f"--- {os.path.basename(path)} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(out)


def wait_released(pg_id: str, timeout: float) -> bool:
    """Wait until Ray no longer lists the bundles of removed placement group `pg_id` (hex) among its
    resources, so that the next group's bundles can be placed. False if they were still there at timeout."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        try:
            state = ray.util.placement_group_table().get(pg_id, {}).get("state", "REMOVED")
            held = [k for k in ray.available_resources() if pg_id in k]
        except Exception:  # Ray itself is gone: nothing is held any more
            return True
        if state == "REMOVED" and not held:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
