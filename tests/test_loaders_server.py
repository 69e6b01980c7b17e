"""End to end with a custom loader: ComfyUI's server with ComfyUI-GGUF and the plugin in custom_nodes/,
a FLUX workflow loading a GGUF file (UnetLoaderGGUF) with a LoRA on it, plugin on and off: the ranks
replay the GGUF node from the server's own custom_nodes and model folders; the images agree."""
import os
import re

import comfy.utils
import numpy as np
import pytest
from PIL import Image

from comfy_xdit_patch import locate
from comfy_xdit_patch.tools import headless, synthetic
from conftest import COMFYUI, REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, router, tiny_flux):
    package = locate.find_comfyui_gguf()
    if package is None:
        pytest.skip("no ComfyUI-GGUF checkout (set COMFYUI_GGUF_PATH or put it in ComfyUI's custom_nodes)")
    pytest.importorskip("gguf", reason="the gguf package (requirements-test.txt) is not installed")
    router.close_group()  # 2 cores: the servers' ranks get them to themselves
    base = headless.prepare_base(str(tmp_path_factory.mktemp("comfy_gguf_base")), REPO)
    link = os.path.join(base, "custom_nodes", "ComfyUI-GGUF")
    if not os.path.lexists(link):
        os.symlink(package, link)
    sd = comfy.utils.load_torch_file(tiny_flux)
    synthetic.save_gguf(sd, os.path.join(base, "models/diffusion_models/tiny_flux_Q8_0.gguf"), "Q8_0")
    lora = synthetic.lora(sd, rank=4, seed=1, scale=0.1)
    synthetic.save(lora, os.path.join(base, "models/loras/tiny_lora.safetensors"))
    synthetic.save(synthetic.taesd_vae(16, seed=0), os.path.join(base, "models/vae/tiny_taesd16.safetensors"))
    return base


def workflow():
    wf = headless.flux_workflow(96, 80, steps=4, seed=5, unet="unused", vae="tiny_taesd16.safetensors",
                                context_dim=synthetic.TINY_CONTEXT_DIM)
    wf["gguf"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "tiny_flux_Q8_0.gguf"}}
    wf["model"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["gguf", 0], "lora_name": "tiny_lora.safetensors", "strength_model": 1.0}}
    return wf


def render(base_dir, enabled):
    name = "on" if enabled else "off"
    env = {"COMFY_XDIT": enabled, "COMFY_XDIT_WORKERS": "2"}
    log_path = os.path.join(base_dir, f"{name}.log")
    with headless.Server(COMFYUI, base_dir, env=env, cpu=True, log_path=log_path) as server:
        result = server.run(workflow(), timeout=600)
        log = server.log()
    return np.asarray(Image.open(result["images"][0])).astype(np.int16), log


def test_gguf_with_lora_in_comfyui_server(base_dir):
    on, log_on = render(base_dir, "1")
    off, _ = render(base_dir, "0")
    assert re.search(r"4 of 4 model calls ran on the 2-rank worker group", log_on), log_on[-3000:]
    assert on.shape == off.shape == (80, 96, 3) and on.std() > 1
    assert np.abs(on - off).max() <= 1
