"""Attaching and detaching: the toggle, bad values, exact originals, what is left alone."""
import logging

import comfy.model_management
import comfy.samplers
import comfy.sd
import pytest

from comfy_xdit_patch import plans
from comfy_xdit_patch.driver import calls, patch
from conftest import assert_originals


def test_installed_wrappers_and_exact_restore(router, unrouted):
    assert patch.installed()
    assert comfy.samplers.CFGGuider.__dict__["sample"].__wrapped__ is not None
    assert comfy.sd.VAE.__dict__["decode"].__wrapped__ is not None
    with unrouted():
        assert_originals()
    assert patch.installed()


@pytest.fixture
def hook(monkeypatch, unrouted):
    """Run the custom-node start-up hook as ComfyUI would, with the session plugin detached."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "hooks", "custom_node.py")
    spec = importlib.util.spec_from_file_location("xdit_hook_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(env: dict):
        import comfy_xdit_patch

        monkeypatch.setattr(comfy_xdit_patch, "loaded_from", None, raising=False)  # each run: a new ComfyUI start
        for k in list(os.environ):
            if k.startswith("COMFY_XDIT"):
                monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with unrouted():
            result = module.on_load()
            try:
                if result is None:
                    assert_originals()
                return result
            finally:
                if result is not None:
                    patch.uninstall()

    return run


def test_toggle_off_installs_nothing(hook):
    assert hook({"COMFY_XDIT": "0"}) is None
    assert hook({}) is None  # unset: on only with >= 2 GPUs; this machine has none


def test_toggle_on_installs(hook, caplog):
    with caplog.at_level(logging.INFO, logger="comfy_xdit_patch"):
        router = hook({"COMFY_XDIT": "1", "COMFY_XDIT_WORKERS": "2"})
    assert router is not None and router.config.workers == 2
    # the start-up line names every family routed on this ComfyUI
    assert "comfy_xdit_patch: routing FLUX, Chroma and Wan to 2 CPU rank(s)" in caplog.messages


@pytest.mark.parametrize("var,value", [("COMFY_XDIT_WORKERS", "two"), ("COMFY_XDIT_PARALLEL", "ring=banana"),
                                       ("COMFY_XDIT_FALLBACK", "sometimes")])
def test_bad_value_leaves_comfyui_unpatched_with_one_message(hook, caplog, var, value):
    with caplog.at_level(logging.ERROR, logger="comfy_xdit_patch"):
        assert hook({"COMFY_XDIT": "1", var: value}) is None
    lines = [r.getMessage() for r in caplog.records if r.name == "comfy_xdit_patch"]
    assert len(lines) == 1 and var in lines[0] and "accepted" in lines[0]


def test_only_the_families_with_a_plan_are_routed():
    import comfy.ldm.flux.model as flux
    import comfy.ldm.modules.diffusionmodules.openaimodel as unet
    import comfy.ldm.wan.model as wan

    assert plans.plan_for(object.__new__(flux.Flux)).family == "flux"
    assert plans.plan_for(object.__new__(wan.WanModel)).family == "wan"
    for other in (unet.UNetModel, wan.VaceWanModel):  # SDXL/SD1.5; a Wan variant with inputs of its own
        assert plans.plan_for(object.__new__(other)) is None


def test_only_options_the_model_reads_cross_so_each_run_has_the_same_call_signature(load_flux, tiny_flux):
    """Per-run values (uuids, sigmas) would make every image a new call signature on the ranks: an eager
    call and a CUDA graph capture per image instead of replays."""
    import uuid

    import torch

    model = load_flux(tiny_flux).model.diffusion_model
    plan = plans.plan_for(model)
    x = torch.zeros(1, 16, 8, 8)
    kwargs = dict(timestep=torch.ones(1), context=torch.zeros(1, 8, 32), y=torch.zeros(1, 768),
                  guidance=torch.ones(1))
    sent = []
    for run in range(2):
        options = {"uuids": [uuid.uuid4()], "sigmas": torch.full((1,), 0.5 + run), "cond_or_uncond": [0],
                   "sample_sigmas": torch.linspace(1, 0, 5 + run), "rope_options": {"scale_x": 1.0}}
        checked = calls.check(plan, model, (x,), dict(kwargs, transformer_options=options))
        assert checked.reason is None
        sent.append(checked.kwargs["transformer_options"])
    assert sent[0] == sent[1] == {"rope_options": {"scale_x": 1.0}}


def test_other_models_are_not_skipped_by_load_models_gpu(router, load_flux, tiny_flux):
    """Only the routed model of the current run is kept off; anything else loads as usual."""
    model = load_flux(tiny_flux)
    comfy.model_management.load_models_gpu([model])
    assert any(m.model is model.model for m in comfy.model_management.loaded_models())


_PRESTART = """
import sys, time
import psutil
from comfy_xdit_patch import config, locate
locate.import_comfy(cpu=True)
from comfy_xdit_patch.driver import router
r = router.Router(config.load({"COMFY_XDIT": "1"}, gpus=0))
r.prestart().join()  # the thread that started Ray has ended
time.sleep(2)
ray_procs = [p for p in psutil.Process().children(recursive=True) if p.name() in ("gcs_server", "raylet")]
print("ray processes:", sorted((p.name(), p.status()) for p in ray_procs))
assert len(ray_procs) == 2 and all(p.status() != psutil.STATUS_ZOMBIE for p in ray_procs)
assert [s["rank"] for s in r.group.stats()] == [0, 1]
r.close_group()
"""


@pytest.mark.slow  # ~40 s: a Ray cluster of its own
def test_prestarted_group_outlives_the_thread_that_started_it():
    """Ray's GCS and raylet die with the thread that starts them: the plugin starts Ray on its own thread."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _PRESTART], cwd=root, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_ranks_start_with_torchs_own_cuda_allocator(monkeypatch):
    """ComfyUI's main.py asks for cudaMallocAsync; the ranks' environment drops that backend (CUDA graph
    capture of the compiled blocks aborted under it) and keeps every other allocator option."""
    from comfy_xdit_patch.group.cluster import rank_env

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True,backend:cudaMallocAsync")
    assert rank_env() == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert rank_env() == {"PYTORCH_CUDA_ALLOC_CONF": ""}
