"""End to end: ComfyUI's server (main.py --cpu) with the plugin installed as README says, a stock
API-format workflow POSTed to /prompt with the plugin on and off: the saved images agree."""
import os
import re
import time

import numpy as np
import pytest
from PIL import Image

from comfy_xdit_patch.tools import headless, synthetic
from conftest import COMFYUI, REPO


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, router):
    router.close_group()  # this machine has 2 cores: the servers' ranks get them to themselves
    base = headless.prepare_base(str(tmp_path_factory.mktemp("comfy_base")), REPO)
    synthetic.save(synthetic.tiny_flux(seed=0), os.path.join(base, "models/diffusion_models/tiny_flux.safetensors"))
    synthetic.save(synthetic.taesd_vae(16, seed=0), os.path.join(base, "models/vae/tiny_taesd16.safetensors"))
    synthetic.save(synthetic.kl_vae(seed=0), os.path.join(base, "models/vae/tiny_kl.safetensors"))
    return base


WORKFLOW = headless.flux_workflow(96, 80, steps=4, seed=5, unet="tiny_flux.safetensors",
                                  vae="tiny_taesd16.safetensors", context_dim=synthetic.TINY_CONTEXT_DIM)
# FLUX.1's own kind of VAE (a KL decoder), which the ranks can decode by rows
KL_WORKFLOW = headless.flux_workflow(96, 80, steps=4, seed=5, unet="tiny_flux.safetensors",
                                     vae="tiny_kl.safetensors", context_dim=synthetic.TINY_CONTEXT_DIM)


def render(base_dir, env, name, before=None, after=None, workflow=WORKFLOW):
    with headless.Server(COMFYUI, base_dir, env=dict(env, COMFY_XDIT_WORKERS="2"), cpu=True,
                         log_path=os.path.join(base_dir, f"{name}.log")) as server:
        if before:
            before(server)
        result = server.run(workflow, timeout=600)
        if after:
            after(server)
        log = server.log()
    assert len(result["images"]) == 1
    return np.asarray(Image.open(result["images"][0])).astype(np.int16), log


def ranks_allocator(server):
    """The ranks' own environment: ComfyUI's allocator backend dropped, its other options kept (a CUDA graph
    capture aborts under cudaMallocAsync), through the private Ray the early start began, with no
    runtime_env of their own."""
    for rank in server._get("/xdit/status?ranks=1")["ranks"]:
        with open(f"/proc/{rank['pid']}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        assert env[b"PYTORCH_CUDA_ALLOC_CONF"] == b"expandable_segments:True", rank


def test_images_agree_with_plugin_on_and_off(base_dir):
    """With FLUX's kind of VAE, and its decode on the ranks too (COMFY_XDIT_VAE_MIN_PIXELS=0: any size)."""
    on, log_on = render(base_dir, {"COMFY_XDIT": "1", "COMFY_XDIT_VAE_MIN_PIXELS": "0",
                                   "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,backend:cudaMallocAsync"},
                        "on", after=ranks_allocator, workflow=KL_WORKFLOW)
    off, log_off = render(base_dir, {"COMFY_XDIT": "0"}, "off", workflow=KL_WORKFLOW)
    assert "worker group ready: 2 ranks" in log_on
    assert "decoded a 1x16x10x12 latent with the KL VAE on 2 ranks" in log_on
    # started by prestartup_script.py before ComfyUI imported its nodes, and that group was the one used
    assert -1 < log_on.find("starting 2 CPU ranks while ComfyUI loads") < log_on.find("Import times for custom nodes")
    assert log_on.count("worker group ready") == 1
    assert "Torch already imported" not in log_on  # ComfyUI's warning: nothing imported torch before it did
    assert re.search(r"4 of 4 model calls ran on the 2-rank worker group", log_on)
    assert "comfy_xdit_patch: off" in log_off and "worker group" not in log_off
    assert on.shape == off.shape == (80, 96, 3)
    assert on.std() > 1, "the test VAE should draw a non-uniform picture"
    assert np.abs(on - off).max() <= 1


def test_a_restarted_comfyui_loads_the_last_runs_model_ahead(base_dir):
    """A process that started its group early records the base model of its last routed run (under
    COMFY_XDIT_CACHE_DIR); the next process's group loads it as soon as it is up, with no prompt yet."""
    first, _ = render(base_dir, {"COMFY_XDIT": "1"}, "first")
    record = os.path.join(base_dir, "xdit-cache", "last_model.pkl")  # headless.Server's COMFY_XDIT_CACHE_DIR
    # it holds the prompt's embeddings: for the user alone
    assert os.stat(record).st_mode & 0o777 == 0o600 and os.stat(os.path.dirname(record)).st_mode & 0o777 == 0o700

    def loaded_ahead(server):  # no prompt is sent until the ranks hold the model
        deadline = time.monotonic() + 300
        while "loaded the last run's model ahead on 2 ranks" not in server.log():
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.5)

    again, log = render(base_dir, {"COMFY_XDIT": "1"}, "again", before=loaded_ahead)
    assert re.search(r"4 of 4 model calls ran on the 2-rank worker group", log)
    assert log.count("loaded the last run's model ahead") == 1 and log.count("worker group ready") == 1
    # and its first call (recorded on the CPU) ran once on the ranks, ahead of the prompt
    assert -1 < log.find("ran the last run's first call ahead") < log.find("4 of 4 model calls ran"), log[-3000:]
    assert np.abs(first - again).max() == 0
    # a file changed since: the ranks refuse that record (as any spec with other stamps), and load it for the run
    unet = os.path.join(base_dir, "models/diffusion_models/tiny_flux.safetensors")
    os.utime(unet, ns=(os.stat(unet).st_atime_ns, os.stat(unet).st_mtime_ns + 10**9))
    changed, log = render(base_dir, {"COMFY_XDIT": "1"}, "changed")
    assert "the last run's model was not loaded ahead" in log and "loaded the last run's model ahead" not in log
    assert re.search(r"4 of 4 model calls ran on the 2-rank worker group", log)
    assert np.abs(first - changed).max() == 0


def test_two_copies_in_custom_nodes_one_serves(base_dir, tmp_path):
    """The link install.py made plus a copy under another name (a Manager install beside a git clone): ComfyUI
    starts and serves, the first copy loaded routes every call once, the other logs one line and does nothing."""
    import shutil

    copy = os.path.join(base_dir, "custom_nodes", "comfy-xdit-second-copy")
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "bench_out", ".devkit", ".whl"))
    try:
        with headless.Server(COMFYUI, base_dir, env={"COMFY_XDIT": "1", "COMFY_XDIT_WORKERS": "2"}, cpu=True,
                             log_path=os.path.join(base_dir, "two-copies.log")) as server:
            server.run(WORKFLOW, timeout=600)
            status = server._get("/xdit/status")
            log = server.log()
    finally:
        shutil.rmtree(copy)
    lines = [line for line in log.splitlines() if "this copy" in line and "does nothing" in line]
    assert len(lines) == 1 and "comfy-xdit-second-copy" in log and os.path.join("custom_nodes", "comfy_xdit_patch") \
        in lines[0], lines
    assert status["last_run"]["routed"] == 4 and status["last_run"]["local"] == 0, status["last_run"]
    assert log.count("routing FLUX, Chroma and Wan to 2") == 1 and log.count("worker group ready") == 1
    assert re.search(r"4 of 4 model calls ran on the 2-rank worker group", log)


@pytest.mark.slow  # ~20 s: a server of its own
def test_bad_value_starts_comfyui_unpatched_and_serving(base_dir):
    img, log = render(base_dir, {"COMFY_XDIT": "1", "COMFY_XDIT_FALLBACK": "maybe"}, "bad")
    assert "COMFY_XDIT_FALLBACK='maybe' is not valid" in log
    assert "worker group" not in log and img.shape == (80, 96, 3)


def test_a_run_while_the_group_starts_runs_as_comfyui_alone_and_the_next_is_routed(base_dir):
    """COMFY_XDIT_WHILE_STARTING=local (the default; test servers wait): a prompt that comes while the group
    started with ComfyUI is still starting runs in ComfyUI's process, as without the plugin, instead of
    waiting for the ranks; once the group is up, the same prompt is routed, with the same image."""
    env = {"COMFY_XDIT": "1", "COMFY_XDIT_WORKERS": "2", "COMFY_XDIT_WHILE_STARTING": "local",
           # each rank holds 15 s in its start (tests/inject/sitecustomize.py): the prompt comes first
           "XDIT_TEST_PAUSE": "init=15", "PYTHONPATH": os.pathsep.join(
               filter(None, (os.path.join(REPO, "tests", "inject"), os.environ.get("PYTHONPATH"))))}
    # --cache-none: ComfyUI runs the same prompt again (a /free request is acted on only after the next prompt)
    with headless.Server(COMFYUI, base_dir, env=env, cpu=True, extra_args=("--cache-none",),
                         log_path=os.path.join(base_dir, "while-starting.log")) as server:
        local = server.run(WORKFLOW, timeout=600)
        status = server._get("/xdit/status")
        assert status["runs_while_starting"] == 1 and status["routed_calls"] == 0, status
        assert "still starting; this run stays in ComfyUI's process" in server.log()
        deadline = time.monotonic() + 300
        while "done" not in (server._get("/xdit/status")["early_start"] or {}):
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.5)
        routed = server.run(WORKFLOW, timeout=600)
        log = server.log()
    assert re.search(r"4 of 4 model calls ran on the 2-rank worker group", log), log[-3000:]
    a, b = (np.asarray(Image.open(r["images"][0])).astype(np.int16) for r in (local, routed))
    assert a.std() > 1 and np.abs(a - b).max() <= 1
