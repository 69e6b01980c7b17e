"""FLUX.2 [dev] and [klein] as a family of their own: tiny layouts that ComfyUI detects as Flux2 (128-channel
latents at size / 16, 4-axis RoPE, modulation shared by all blocks, text padded to 512 tokens), in stock
workflows, routed vs ComfyUI alone (max |delta| <= 1e-4, every call on every rank)."""
import pytest
import torch

from conftest import comparer
from flux2_cases import CASES, WORKFLOWS, execute, make_lora, quantized_files


@pytest.fixture(scope="module")
def flux2(flux2_file, models_dir):
    import comfy.sd

    loaded = {}

    def get(layout):
        if layout not in loaded:
            path = flux2_file(layout)
            make_lora(models_dir, path, layout)
            loaded[layout] = comfy.sd.load_diffusion_model(path)
            assert type(loaded[layout].model).__name__ == "Flux2"
        return loaded[layout]

    return get


@pytest.mark.parametrize("layout,workflow", CASES)
def test_flux2_workflow(router, unrouted, flux2, layout, workflow):
    comparer(router, unrouted, every_call=True)(lambda: WORKFLOWS[workflow](flux2(layout), layout))


def test_flux2_features_reach_the_model(unrouted, flux2):
    """ComfyUI alone: CFG, the reference latents and the LoRA each change FLUX.2's result (so the equal
    results above compare something)."""
    with unrouted():
        out = {name: WORKFLOWS[name](flux2("dev"), "dev") for name in WORKFLOWS}
    for name in ("cfg", "multi_reference", "lora"):
        assert (out[name] - out["text_to_image"]).abs().max() > 1e-3, name
    assert (out["multi_reference"] - out["multi_reference_cfg"]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def gguf_loader():
    """ComfyUI-GGUF's UnetLoaderGGUF, or None where there is no checkout."""
    import asyncio

    import nodes

    from comfy_xdit_patch import locate

    path = locate.find_comfyui_gguf()
    if path is None or pytest.importorskip("gguf") is None:
        return None
    if "UnetLoaderGGUF" not in nodes.NODE_CLASS_MAPPINGS:
        assert asyncio.run(nodes.load_custom_node(path))
    return nodes.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]


@pytest.mark.parametrize("loader", [pytest.param("fp8_e4m3fn", marks=pytest.mark.slow), "fp8mixed", "Q8_0",
                                    pytest.param("Q4_K", marks=pytest.mark.slow)])
def test_flux2_loaders(router, unrouted, flux2_file, models_dir, gguf_loader, loader):
    """UNETLoader storing fp8, a mixed-precision fp8 file (as Comfy-Org's flux2_dev_fp8mixed) and GGUF files,
    with a LoRA on top (the ranks run the loader node again and patch as ComfyUI does)."""
    import os

    import nodes

    path = flux2_file("dev")
    make_lora(models_dir, path, "dev")
    if loader in ("Q8_0", "Q4_K") and gguf_loader is None:
        pytest.skip("no ComfyUI-GGUF checkout (set COMFYUI_GGUF_PATH)")
    names = quantized_files(models_dir, path, "dev", gguf=gguf_loader is not None)
    compare = comparer(router, unrouted, every_call=True)
    # NOTE: all under inference mode, as ComfyUI's executor runs nodes: its LoRA on fp8 weights fails with
    # autograd on (an out= clamp), and on quantized tensors made outside inference mode
    with torch.inference_mode():
        if loader == "fp8_e4m3fn":
            (model,) = execute(nodes.UNETLoader, unet_name=os.path.basename(path), weight_dtype="fp8_e4m3fn")
        elif loader == "fp8mixed":
            (model,) = execute(nodes.UNETLoader, unet_name=names[loader], weight_dtype="default")
        else:
            (model,) = execute(gguf_loader, unet_name=names[loader])
        assert type(model.model).__name__ == "Flux2"
        compare(lambda: WORKFLOWS["text_to_image"](model, "dev"))
        compare(lambda: WORKFLOWS["lora"](model, "dev"))
