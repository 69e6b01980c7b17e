"""FLUX.2 [dev] and [klein] as a family of their own: tiny layouts that ComfyUI detects as Flux2 (128-channel
latents at size / 16, 4-axis RoPE, modulation shared by all blocks, text padded to 512 tokens), in stock
workflows, routed vs ComfyUI alone (max |delta| <= 1e-4, every call on every rank)."""
import pytest
import torch

from conftest import comparer
import flux2_cases
from flux2_cases import CASES, WORKFLOWS, make_lora


@pytest.fixture(scope="module")
def flux2(flux2_file, models_dir):
    """flux2(layout) -> (the tiny model, loaded once, the name of a LoRA for it)."""
    import comfy.sd

    loaded = {}

    def get(layout):
        if layout not in loaded:
            path = flux2_file(layout)
            loaded[layout] = comfy.sd.load_diffusion_model(path), make_lora(models_dir, path)
            assert type(loaded[layout][0].model).__name__ == "Flux2"
        return loaded[layout]

    return get


@pytest.mark.parametrize("layout,workflow", CASES)
def test_flux2_workflow(router, unrouted, flux2, layout, workflow):
    model, lora = flux2(layout)
    comparer(router, unrouted, every_call=True)(lambda: WORKFLOWS[workflow](model, layout, lora))


def test_flux2_features_reach_the_model(unrouted, flux2):
    """ComfyUI alone: CFG, the reference latents and the LoRA each change FLUX.2's result (so the equal
    results above compare something)."""
    model, lora = flux2("dev")
    with unrouted():
        out = {name: WORKFLOWS[name](model, "dev", lora) for name in WORKFLOWS}
    for name in ("cfg", "multi_reference", "lora"):
        assert (out[name] - out["text_to_image"]).abs().max() > 1e-3, name
    assert (out["multi_reference"] - out["multi_reference_cfg"]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", [pytest.param("fp8_e4m3fn", marks=pytest.mark.slow), "fp8mixed", "Q8_0",
                                  pytest.param("Q4_K", marks=pytest.mark.slow)])
def test_flux2_loaders(router, unrouted, flux2_file, models_dir, kind):
    """UNETLoader storing fp8, a mixed-precision fp8 file (as Comfy-Org's flux2_dev_fp8mixed) and GGUF files,
    with a LoRA on top (the ranks run the loader node again and patch as ComfyUI does)."""
    gguf = flux2_cases.gguf_loader()
    if kind in ("Q8_0", "Q4_K") and gguf is None:
        pytest.skip("no ComfyUI-GGUF checkout (set COMFYUI_GGUF_PATH) or no gguf package")
    path = flux2_file("dev")
    lora = make_lora(models_dir, path)
    compare = comparer(router, unrouted, every_call=True)
    # NOTE: all under inference mode, as ComfyUI's executor runs nodes: its LoRA on fp8 weights fails with
    # autograd on (an out= clamp), and on quantized tensors made outside inference mode
    with torch.inference_mode():
        model = flux2_cases.load(kind, path, models_dir, gguf)
        compare(lambda: WORKFLOWS["text_to_image"](model, "dev"))
        compare(lambda: WORKFLOWS["lora"](model, "dev", lora))
