"""errors.classify: every way a rank can vanish is transient (the run falls back, the next starts a new
group); only what would repeat unpatches."""
import pytest
import ray.exceptions as rx

from comfy_xdit_patch import errors
from comfy_xdit_patch.errors import (GroupBroken, RayLost, StartTimeout, StepTimeout, WorkerDied, WorkerFailed,
                                     classify)


def task_error(cause: BaseException):
    return rx.RayTaskError("init_distributed", "Traceback ...", cause)


@pytest.mark.parametrize("exc, kind", [
    (rx.ActorDiedError(), WorkerDied),
    (rx.ActorUnavailableError("unreachable", None), WorkerDied),
    (rx.RayActorError(), WorkerDied),
    (rx.WorkerCrashedError(), WorkerDied),
    (rx.OutOfMemoryError("killed by the memory monitor"), WorkerDied),
    (rx.NodeDiedError("node gone"), WorkerDied),
    (rx.RaySystemError("raylet gone"), RayLost),
    (rx.LocalRayletDiedError(), RayLost),
    (rx.GetTimeoutError("start"), StartTimeout),
    (EOFError(), WorkerDied),
    (BrokenPipeError(32, "Broken pipe"), WorkerDied),
    (ConnectionResetError(104, "reset"), WorkerDied),
    (task_error(rx.ActorDiedError()), WorkerDied),  # a rank's call saw another rank die
    (task_error(ValueError("bad weights")), WorkerFailed),  # a rank raised: it would again
    (ImportError("no module named yunchang"), GroupBroken),
    (StepTimeout("hung"), StepTimeout),
    (WorkerFailed("rank 0: RuntimeError: boom"), WorkerFailed),
])
def test_kind(exc, kind):
    got = classify(exc)
    assert type(got) is kind, (exc, got)
    assert got.transient == (kind in (WorkerDied, RayLost, StartTimeout, StepTimeout))


def test_a_rank_that_failed_to_construct_repeats():
    init = task_error(ImportError("comfy"))
    assert type(classify(rx.ActorDiedError(init))) is WorkerFailed


def test_a_peers_error_after_a_death_is_the_death():
    """rank 0's gloo error surfaced first, but rank 1's process is gone: transient."""
    got = classify(WorkerFailed("rank 0: RuntimeError: Connection closed by peer"), dead="rank 1 (pid 9) is gone")
    assert type(got) is WorkerDied and "rank 1" in str(got)
    assert isinstance(got.__cause__, WorkerFailed)


def test_start_timeout_is_not_a_step_timeout():
    assert not issubclass(errors.StartTimeout, errors.StepTimeout)
