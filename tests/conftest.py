"""Real ComfyUI, CPU mode, one Ray cluster and one 2-rank worker group for the whole session."""
from __future__ import annotations

import contextlib
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_xdit_patch import locate  # noqa: E402

if locate.find_comfyui() is None:
    pytest.exit(locate.HOW_TO_GET, returncode=4)
COMFYUI = locate.import_comfy(cpu=True)

import comfy.model_management  # noqa: E402  (after args.cpu)
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402

# ComfyUI's functions before any test attached the plugin
ORIGINALS = {
    (comfy.samplers.CFGGuider, "sample"): comfy.samplers.CFGGuider.__dict__["sample"],
    (comfy.model_management, "load_models_gpu"): comfy.model_management.__dict__["load_models_gpu"],
    (comfy.sd.VAE, "decode"): comfy.sd.VAE.__dict__["decode"],
}


def assert_originals():
    for (owner, name), original in ORIGINALS.items():
        assert owner.__dict__[name] is original, f"{name} is not ComfyUI's original"

WORKERS = 2
TOL = 1e-4


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_flux(models_dir) -> str:
    """A FLUX.1-dev-shaped checkpoint: 2 heads, 1 double + 2 single blocks, guidance embedding."""
    from comfy_xdit_patch.tools import synthetic

    return synthetic.save(synthetic.tiny_flux(seed=0), os.path.join(models_dir, "tiny_flux_dev.safetensors"))


@pytest.fixture(scope="session")
def config():
    from comfy_xdit_patch import config as cfg

    return cfg.load({"COMFY_XDIT": "1", "COMFY_XDIT_WORKERS": str(WORKERS), "COMFY_XDIT_TIMEOUT": "60"}, gpus=0)


@pytest.fixture(scope="session")
def router(config):
    """The plugin, attached for the session; tests detach it with `unrouted()` for references."""
    from comfy_xdit_patch.driver import seams
    from comfy_xdit_patch.driver import patch

    try:
        r = patch.install(config)
    except seams.Missing as e:  # an older ComfyUI: tests/test_seams.py checks that it is left as shipped
        pytest.skip(f"comfy_xdit_patch steps aside on this ComfyUI: {e}")
    yield r
    patch.uninstall()


@pytest.fixture
def unrouted(router):
    """Context manager: ComfyUI exactly as shipped (original functions), same worker group kept."""
    from comfy_xdit_patch.driver import patch

    @contextlib.contextmanager
    def detached():
        kept = patch.uninstall(close_group=False)
        try:
            yield
        finally:
            patch.install(kept.config, router=kept)

    return detached


@pytest.fixture
def load_flux():
    import comfy.sd

    return lambda path: comfy.sd.load_diffusion_model(path)


def sample(model, pos, neg, latent, steps=4, callback=None, seed=3):
    """comfy.sample.sample as KSampler calls it, with a per-step callback and no progress bar."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", pos, neg, latent["samples"],
                               callback=callback, disable_pbar=True, seed=seed)


def ksample(model, positive, negative, latent, steps=3, cfg=1.0, sampler="euler", scheduler="simple", seed=7):
    import nodes

    return nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)[0]["samples"]


def comparer(router, unrouted, every_call: bool = False):
    """compare(fn) -> (routed, reference, routed calls): fn() run by ComfyUI alone, then through `router`'s ranks;
    `every_call`: no model call of the routed run ran in ComfyUI's process."""

    def run(fn, expect_routed=True):
        with unrouted():
            reference = fn()
        before = router.stats["routed_calls"]
        local_before = router.stats["local_calls"], router.stats["fallbacks"]
        worker_before = [s["calls"] for s in router.group.stats()] if router.group else None
        routed = fn()
        calls = router.stats["routed_calls"] - before
        if expect_routed:
            assert calls > 0, f"nothing was routed: {router.stats}, disabled: {router.disabled}"
            worker_after = [s["calls"] for s in router.group.stats()]
            worker_before = worker_before or [0] * len(worker_after)
            # every rank computed every routed call
            assert [a - b for a, b in zip(worker_after, worker_before)] == [calls] * router.group.world
            if every_call:
                local = router.stats["local_calls"], router.stats["fallbacks"]
                assert local == local_before, f"(local calls, fallbacks) went from {local_before} to {local}"
        assert routed.shape == reference.shape
        diff = (routed - reference).abs().max().item()
        assert diff <= TOL, f"routed result differs from ComfyUI's by {diff}"
        return routed, reference, calls

    return run


@pytest.fixture
def compare(router, unrouted):
    """compare(fn) -> (routed, reference, routed calls): fn() run by ComfyUI alone, then through the workers."""
    return comparer(router, unrouted)


def node(cls, **inputs):
    """Run a stock ComfyUI node (classic or io.ComfyNode) the way the executor does; its outputs."""
    if hasattr(cls, "FUNCTION"):
        return getattr(cls(), cls.FUNCTION)(**inputs)
    return cls.execute(**inputs).result


@pytest.fixture(scope="session")
def flux_file(models_dir):
    """flux_file(**tiny_flux params) -> path of a tiny FLUX checkpoint made once per session."""
    from comfy_xdit_patch.tools import synthetic

    made = {}

    def make(**params):
        key = tuple(sorted(params.items()))
        if key not in made:
            name = "flux_" + "_".join(f"{k}{v}" for k, v in key) + ".safetensors"
            made[key] = synthetic.save(synthetic.tiny_flux(**params), os.path.join(models_dir, name))
        return made[key]

    return make


@pytest.fixture(scope="session")
def flux2_file(models_dir):
    """flux2_file(layout, **tiny_flux2 params) -> path of a tiny FLUX.2 ("dev" or "klein") made once per session."""
    from comfy_xdit_patch.tools import synthetic

    made = {}

    def make(layout="dev", **params):
        key = (layout,) + tuple(sorted(params.items()))
        if key not in made:
            name = f"flux2_{layout}" + "".join(f"_{k}{v}" for k, v in key[1:]) + ".safetensors"
            made[key] = synthetic.save(synthetic.tiny_flux2(layout, **params), os.path.join(models_dir, name))
        return made[key]

    return make
