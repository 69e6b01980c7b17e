"""What can go wrong on the routed path, what each kind implies, and the one place that decides which
kind an exception is (`classify`).

Every error falls back: the call runs in ComfyUI's own process and returns the same result.
`transient` errors (a rank's process went away or stopped answering, a call or the start timed out,
Ray itself was lost) also tear the group down; the next sampling run starts a fresh one. Errors that
will repeat (a rank raised, a dependency is missing, the ranks can't load the model) unpatch the plugin
for the rest of the process.
"""
from __future__ import annotations

import sys


class RoutingError(Exception):
    transient = False


class GroupBroken(RoutingError):
    """The worker group could not start or lost its footing; restarting it would fail the same way."""


class WorkerFailed(RoutingError):
    """A rank raised while serving a request (the same request would raise again)."""


class WorkerDied(RoutingError):
    """A rank's process went away or can't be reached (killed, OOM, its node or raylet gone)."""

    transient = True


class StepTimeout(RoutingError):
    """A request got no reply within its bound (a hung rank)."""

    transient = True


class StartTimeout(RoutingError):
    """The worker group did not come up within COMFY_XDIT_START_TIMEOUT (a busy machine, a stalled rank)."""

    transient = True


class RayLost(WorkerDied):
    """Ray's own processes (GCS, raylet) of the private cluster are gone: the next group starts Ray again."""


class Cancelled(RoutingError):
    """The group was closed while it was still starting (a teardown overtook it)."""

    transient = True


class LayoutError(ValueError):
    """This input cannot be split over this many ranks (it runs on one GPU instead)."""


class Unroutable(RoutingError):
    """This input can't be routed (it runs locally); nothing is wrong with the group."""

    transient = True


class ClusterUnreachable(RoutingError):
    """The Ray cluster at COMFY_XDIT_RAY_ADDRESS can't be joined now (nothing listens there, it is no Ray GCS,
    it refuses this process's token, or it runs another Ray): FLUX runs in ComfyUI's process, and a run after a
    back-off tries again; nothing on this side is broken."""

    transient = True


class ClusterShort(Unroutable):
    """A joined Ray cluster has no room for the group now (a node left, or is busy): this run is computed
    in ComfyUI's process and the next one tries again; nothing on this side is broken."""


class ModelFileMissing(Unroutable):
    """A model's file is not on a rank's node: that model runs in ComfyUI's process (checked again on every
    run, so copying the file there is enough); other models keep being routed."""


# Ray's exceptions by name (ray is imported lazily, and may be absent): a rank or its node is gone
_RAY_DIED = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "OutOfMemoryError",
             "NodeDiedError", "ObjectLostError", "OwnerDiedError", "TaskCancelledError", "ActorUnschedulableError")
# Ray's own processes are gone or unreachable
_RAY_LOST = ("RaySystemError", "LocalRayletDiedError", "RpcError", "GcsUnavailableError")
# the other end of a rank's connection closed (channel.py, a peer in a collective)
_PIPE = (EOFError, BrokenPipeError, ConnectionResetError, ConnectionAbortedError, ConnectionRefusedError)


def _ray_names(e: BaseException) -> set[str]:
    if "ray" not in sys.modules:
        return set()
    return {c.__name__ for c in type(e).__mro__ if c.__module__.startswith("ray")}


def classify(e: BaseException, dead: str | None = None) -> RoutingError:
    """The kind of `e`. dead: why a rank is known to be gone (the group checked), or None: then a rank's
    own error (one that would repeat) is told apart from the fallout of a peer's death by `e` alone."""
    if isinstance(e, RoutingError) and (e.transient or dead is None):
        return e
    if dead is not None:  # whatever surfaced first (a peer's collective error, a timeout), a rank is gone
        return _chain(WorkerDied(f"{dead} ({type(e).__name__}: {_short(e)})"), e)
    names = _ray_names(e)
    if names & set(_RAY_LOST):
        return _chain(RayLost(f"Ray is unreachable: {type(e).__name__}: {_short(e)}"), e)
    if getattr(e, "actor_init_failed", False):  # a rank's constructor raised (an import, the device)
        return _chain(WorkerFailed(f"a rank could not start: {_short(e)}"), e)
    if names & set(_RAY_DIED):
        return _chain(WorkerDied(f"a rank died: {type(e).__name__}: {_short(e)}"), e)
    if "GetTimeoutError" in names:
        return _chain(StartTimeout(f"the worker group did not answer in time: {_short(e)}"), e)
    if "RayTaskError" in names:  # a rank's method raised: what it raised decides
        cause = getattr(e, "cause", None)
        if cause is not None and cause is not e:
            inner = classify(cause)
            return inner if inner.transient else _chain(WorkerFailed(f"a rank raised {_short(cause)}"), e)
        return _chain(WorkerFailed(_short(e)), e)
    if isinstance(e, _PIPE):
        return _chain(WorkerDied(f"a rank's connection closed: {type(e).__name__}: {_short(e)}"), e)
    if isinstance(e, ImportError):
        return _chain(GroupBroken(f"a dependency is missing: {e}"), e)
    return _chain(GroupBroken(f"{type(e).__name__}: {_short(e)}"), e)


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _chain(kind: RoutingError, cause: BaseException) -> RoutingError:
    kind.__cause__ = cause
    return kind
