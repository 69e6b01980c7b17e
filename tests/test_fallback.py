"""Any failure on the routed path: the prompt still succeeds with ComfyUI's image; what happens next."""
import dataclasses
import os
import shutil
import signal
import threading

import comfy.model_management
import pytest

import tiny
from conftest import TOL, assert_originals, sample


@pytest.fixture
def setup(load_flux, tiny_flux):
    return load_flux(tiny_flux), tiny.conditioning(1), tiny.conditioning(2), tiny.latent(64, 48)


def test_worker_killed_mid_sampling(router, unrouted, setup):
    model, pos, neg, latent = setup
    with unrouted():
        reference = sample(model, pos, neg, latent)
    sample(model, pos, neg, latent, steps=1)  # group up and model prepared
    group = router.group
    starts, fallbacks, routed = router.life.starts, router.stats["fallbacks"], router.stats["routed_calls"]

    def kill_rank_1(step, *_):
        if step == 1:
            os.kill(group.pids[1], signal.SIGKILL)

    out = sample(model, pos, neg, latent, callback=kill_rank_1)
    assert (out - reference).abs().max().item() <= TOL
    assert router.stats["fallbacks"] == fallbacks + 1
    assert router.stats["routed_calls"] == routed + 2  # steps 0 and 1 routed, 2 and 3 local
    # What happens next (README): the group is shut down, the plugin stays on, and the next
    # sampling run starts a fresh group.
    assert router.active and router.group is None
    again = sample(model, pos, neg, latent)
    assert (again - reference).abs().max().item() <= TOL
    assert router.life.starts == starts + 1 and router.stats["routed_calls"] == routed + 2 + 4


def test_timeout_falls_back_and_restarts(router, unrouted, setup):
    model, pos, neg, _ = setup
    big = tiny.latent(1024, 1024)  # a routed step here takes far longer than the timeout below
    with unrouted():
        reference = sample(model, pos, neg, big, steps=1)
    sample(model, pos, neg, tiny.latent(64, 64), steps=1)
    starts = router.life.starts
    router.group.config = dataclasses.replace(router.group.config, timeout=0.05)  # COMFY_XDIT_TIMEOUT
    out = sample(model, pos, neg, big, steps=1)
    assert (out - reference).abs().max().item() <= TOL
    assert router.active and router.group is None  # torn down, not unpatched
    sample(model, pos, neg, tiny.latent(64, 64), steps=1)
    assert router.life.starts == starts + 1


def test_interrupt_is_never_swallowed(router, unrouted, load_flux, tiny_flux):
    model = load_flux(tiny_flux)
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    big = tiny.latent(1024, 1024)  # one routed step takes long enough to interrupt it mid-wait
    small = tiny.latent(64, 64)
    with unrouted():
        reference = sample(model, pos, neg, small, steps=2)
    sample(model, pos, neg, tiny.latent(64, 64), steps=1)
    fallbacks = router.stats["fallbacks"]
    timer = threading.Timer(0.3, comfy.model_management.interrupt_current_processing, (True,))
    timer.start()
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            sample(model, pos, neg, big, steps=2)
    finally:
        timer.cancel()
        comfy.model_management.interrupt_current_processing(False)
    assert router.active and router.stats["fallbacks"] == fallbacks
    # the abandoned reply is drained: the next run is routed and gives ComfyUI's own result
    routed = router.stats["routed_calls"]
    out = sample(model, pos, neg, small, steps=2)
    assert router.stats["routed_calls"] == routed + 2 and router.group is not None
    assert (out - reference).abs().max().item() <= TOL


def test_error_that_will_repeat_unpatches(config, router, unrouted, tiny_flux, tmp_path, load_flux):
    """The workers can't load the model (its file is now corrupt): ComfyUI's result, then unpatched.
    (A file that is gone is refused per model instead: test_multinode.py.)"""
    from comfy_xdit_patch.driver import patch

    path = shutil.copy(tiny_flux, tmp_path / "soon_gone.safetensors")
    model = load_flux(str(path))
    pos, neg, latent = tiny.conditioning(1), tiny.conditioning(2), tiny.latent(64, 48)
    with unrouted():
        reference = sample(model, pos, neg, latent)
    with open(path, "r+b") as f:  # same size: a truncated header the loader can't read
        f.write(b"\xff" * 64)
    patch.uninstall()  # a fresh plugin instance for this destructive test; the session one comes back after
    fresh = patch.install(config)
    try:
        out = sample(model, pos, neg, latent)
        assert (out - reference).abs().max().item() <= TOL
        assert fresh.disabled and "WorkerFailed" in fresh.disabled
        assert not patch.installed()
        assert_originals()
    finally:
        patch.uninstall()
        patch.install(config, router=router)


def test_close_while_starting_cancels_the_start(config):
    """close_group() during a group's start (the prestart thread holds the lock) never leaves the new
    group alive: the start is cancelled, its ranks are killed, and close_group returns within seconds."""
    import time

    from comfy_xdit_patch.group import lifecycle
    from comfy_xdit_patch.driver.router import Router

    fresh = Router(config)
    thread = fresh.prestart()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (fresh.life.starting is not None and fresh.life.starting.actors):
        time.sleep(0.05)
    starting = fresh.life.starting
    assert starting is not None and starting.actors, "the start never reached its ranks"
    t0 = time.monotonic()
    fresh.close_group()
    thread.join(30)
    assert time.monotonic() - t0 < 30 and not thread.is_alive()
    assert fresh.group is None and fresh.active
    assert starting.cancelled.is_set() and starting.pg is None and starting.actors == []
    assert all(lifecycle.process_gone(pid) for pid in starting.pids)
