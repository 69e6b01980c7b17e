"""What can go wrong on the routed path, and what each kind implies.

Every error falls back: the call runs in ComfyUI's own process and returns the same result.
`transient` errors (a worker died, a call timed out) also tear the group down; the next sampling run
starts a fresh one. Errors that will repeat (a worker raised, the group can't start, Ray or a
dependency is missing) unpatch the plugin for the rest of the process.
"""


class RoutingError(Exception):
    transient = False


class GroupBroken(RoutingError):
    """The worker group could not start or lost its footing; restarting it would fail the same way."""


class WorkerFailed(RoutingError):
    """A rank raised while serving a request."""


class WorkerDied(RoutingError):
    """A rank's process went away."""

    transient = True


class StepTimeout(RoutingError):
    """A request got no reply within its bound."""

    transient = True


class Unroutable(RoutingError):
    """This input can't be routed (it runs locally); nothing is wrong with the group."""

    transient = True


class ClusterShort(Unroutable):
    """A joined Ray cluster has no room for the group now (a node left, or is busy): this run is computed
    in ComfyUI's process and the next one tries again; nothing on this side is broken."""


class ModelFileMissing(Unroutable):
    """A model's file is not on a rank's node: that model runs in ComfyUI's process (checked again on every
    run, so copying the file there is enough); other models keep being routed."""
