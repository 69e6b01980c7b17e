"""Every FLUX loader routes: core (fp8 weight dtypes, all-in-one and quantized checkpoints), a custom
loader node with its own ops, ComfyUI-GGUF (and LoRA on it); routed vs ComfyUI alone (max |delta|
<= 1e-4), every call on every rank. Loaders run through ComfyUI's executor (execution.get_output_data),
where the plugin records the loader nodes it must replay on the ranks."""
import asyncio
import logging
import os

import comfy.utils
import execution
import folder_paths
import nodes
import pytest
import torch

import tiny
from comfy_xdit_patch import locate
from comfy_xdit_patch.driver import models as spec
from comfy_xdit_patch.errors import Unroutable
from comfy_xdit_patch.rank import models as rank_models
from comfy_xdit_patch.wire import spec as wire_spec
from comfy_xdit_patch.tools import synthetic
from conftest import ksample

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_NODES = os.path.join(HERE, "custom_nodes", "xdit_test_loader")


def execute(cls, **inputs):
    """A node's outputs, run the way ComfyUI's executor runs it (the seam the plugin records at)."""
    body = {k: [v] for k, v in inputs.items()}
    output, _, _, pending = asyncio.run(execution.get_output_data(None, "1", cls(), body))
    assert not pending
    return tuple(o[0] for o in output)


def run(model):
    return ksample(model, tiny.conditioning(1), tiny.conditioning(2), tiny.latent(64, 48), steps=3)


@pytest.fixture(scope="module")
def models(models_dir, tiny_flux):
    """ComfyUI's model folders see the session's files; returns (folder, tiny FLUX state dict)."""
    for kind in ("diffusion_models", "checkpoints", "loras"):
        folder_paths.add_model_folder_path(kind, models_dir)
    return models_dir, comfy.utils.load_torch_file(tiny_flux)


def saved(models, name, sd):
    folder, _ = models
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        synthetic.save(sd, path)
    return name


def load_package(path):
    assert asyncio.run(nodes.load_custom_node(path)), f"ComfyUI could not load {path}"


# --- core loaders ------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_dtype", ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"])
def test_unet_loader_weight_dtypes(compare, models, tiny_flux, weight_dtype):
    """On a CPU, `_fast` stores fp8 too but computes like fp8_e4m3fn (ComfyUI's fp8 matmuls need a GPU)."""
    (model,) = execute(nodes.UNETLoader, unet_name=os.path.basename(tiny_flux), weight_dtype=weight_dtype)
    stored = {"default": torch.float32, "fp8_e5m2": torch.float8_e5m2}.get(weight_dtype, torch.float8_e4m3fn)
    assert model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == stored
    compare(lambda: run(model))


def test_checkpoint_loader_fp8_all_in_one(compare, models):
    """Diffusion model (fp8) + VAE in one file; FLUX's text encoders have fixed full sizes (CLIP-L,
    T5-XXL), so the file has none: ComfyUI then loads no CLIP, which the MODEL path doesn't touch."""
    _, sd = models
    ckpt = {"model.diffusion_model." + k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in sd.items()}
    ckpt.update({"first_stage_model." + k: v for k, v in synthetic.taesd_vae().items()})
    name = saved(models, "tiny_flux_fp8_aio.safetensors", ckpt)
    model, _, vae = execute(nodes.CheckpointLoaderSimple, ckpt_name=name)
    assert model.cached_patcher_init is not None and vae is not None
    compare(lambda: run(model))


@pytest.mark.parametrize("layout", ["scaled_fp8", "comfy_quant"])
def test_quantized_checkpoints(compare, models, layout):
    """ComfyUI's own quantized files (scaled fp8, per-layer mixed-precision config), as core loads them."""
    _, sd = models
    name = saved(models, f"tiny_flux_{layout}.safetensors", synthetic.scaled_fp8(sd, layout))
    (model,) = execute(nodes.UNETLoader, unet_name=name, weight_dtype="default")
    assert type(model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight).__name__ == "QuantizedTensor"
    compare(lambda: run(model))


# --- a custom loader node: no recipe, its own ops class -----------------------------------------------
@pytest.fixture(scope="module")
def test_loader():
    load_package(TEST_NODES)
    return nodes.NODE_CLASS_MAPPINGS["XditTestTinyLoader"]


def test_custom_loader_node_is_replayed(compare, models, tiny_flux, test_loader):
    (model,) = execute(test_loader, unet_name=os.path.basename(tiny_flux))
    assert model.cached_patcher_init is None and wire_spec.KEY in model.attachments
    with_ops, _, _ = compare(lambda: run(model))
    (plain,) = execute(nodes.UNETLoader, unet_name=os.path.basename(tiny_flux), weight_dtype="default")
    assert (with_ops - run(plain)).abs().max() > 1e-3  # the ranks used the node's own ops


def test_changed_file_is_another_model(models, test_loader):
    """The node's files are stamped when it ran: loaded again after the file changed, it is another model
    (the ranks load it anew); the model loaded before keeps its stamps, which the ranks now refuse."""
    _, sd = models
    name = "tiny_flux_changing.safetensors"
    path = os.path.join(models[0], name)
    synthetic.save(sd, path)
    (old,) = execute(test_loader, unet_name=name)
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))
    (new,) = execute(test_loader, unet_name=name)
    assert spec.spec_for(old).base_key != spec.spec_for(new).base_key
    with pytest.raises(Unroutable, match="another file"):
        rank_models.check_files(spec.spec_for(old).files)
    (core,) = execute(nodes.UNETLoader, unet_name=name, weight_dtype="default")  # a recipe: stamped alike
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))
    with pytest.raises(Unroutable, match="another file"):
        rank_models.check_files(spec.spec_for(core).files)


def test_unpatched_weights_are_one_state_across_loads(models, tiny_flux):
    """ComfyUI gives each loaded model a new patches_uuid; the ranks compare it with their model's to decide
    whether to restore and re-patch the weights (24 GB moved to the CPU and back for FLUX.1-dev). The same
    file loaded again (a new process, a re-run loader) is the same model to the ranks; a LoRA is not."""
    name = os.path.basename(tiny_flux)
    (first,) = execute(nodes.UNETLoader, unet_name=name, weight_dtype="default")
    (again,) = execute(nodes.UNETLoader, unet_name=name, weight_dtype="default")
    assert first.patches_uuid != again.patches_uuid  # ComfyUI's own view: two patchers
    a, b = spec.spec_for(first), spec.spec_for(again)
    assert a.key == b.key and a.patches_uuid == b.patches_uuid == wire_spec.base_only(a).patches_uuid
    lora = saved(models, "tiny_flux_lora.safetensors", synthetic.lora(models[1], rank=4, seed=1, scale=0.1))
    (patched,) = execute(nodes.LoraLoaderModelOnly, model=first, lora_name=lora, strength_model=1.0)
    assert spec.spec_for(patched).patches_uuid not in (a.patches_uuid, first.patches_uuid)
    assert spec.spec_for(patched).key != a.key


def _runs_local(compare, router, caplog, model, words):
    before = router.stats["routed_calls"]
    with caplog.at_level(logging.INFO, logger="comfy_xdit_patch"):
        compare(lambda: run(model), expect_routed=False)
    assert router.stats["routed_calls"] == before
    said = [r.getMessage() for r in caplog.records if words in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]


def test_unpicklable_loader_input_runs_local(compare, router, caplog, models, tiny_flux, test_loader):
    (model,) = execute(test_loader, unet_name=os.path.basename(tiny_flux), options=lambda: None)
    _runs_local(compare, router, caplog, model, "can't be sent to the ranks")


class ScriptLoader:
    """A loader node registered by a script (here: this test module), which the ranks can't import."""

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    def load(self, unet_name):
        import comfy.sd

        return (comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(
            folder_paths.get_full_path_or_raise("diffusion_models", unet_name))),)


def test_node_the_ranks_cant_import_runs_local(compare, router, caplog, models, tiny_flux):
    (model,) = execute(ScriptLoader, unet_name=os.path.basename(tiny_flux))
    _runs_local(compare, router, caplog, model, "could not replay the loader node ScriptLoader")


def test_file_only_comfyui_sees_runs_local(compare, router, caplog, models, tiny_flux, test_loader):
    """/proc/self/fd/N names a directory ComfyUI's process holds open, and something else (or nothing)
    in a rank's process: the ranks refuse the model before the first step."""
    fd = os.open(os.path.dirname(tiny_flux), os.O_RDONLY | os.O_DIRECTORY)
    try:
        path = f"/proc/self/fd/{fd}/{os.path.basename(tiny_flux)}"
        (model,) = execute(test_loader, unet_name=os.path.basename(tiny_flux), path=path)
        _runs_local(compare, router, caplog, model, path)
    finally:
        os.close(fd)


# --- ComfyUI-GGUF --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_nodes(models):
    path = locate.find_comfyui_gguf()
    if path is None:
        pytest.skip("no ComfyUI-GGUF checkout (set COMFYUI_GGUF_PATH or put it in ComfyUI's custom_nodes)")
    pytest.importorskip("gguf", reason="the gguf package (requirements-test.txt) is not installed")
    load_package(path)
    folder, sd = models
    for qtype in ("F16", "Q8_0", "Q4_K"):
        synthetic.save_gguf(sd, os.path.join(folder, f"tiny_flux_{qtype}.gguf"), qtype)
    return nodes.NODE_CLASS_MAPPINGS


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_K"])
def test_gguf_unet_loader(compare, gguf_nodes, qtype):
    (model,) = execute(gguf_nodes["UnetLoaderGGUF"], unet_name=f"tiny_flux_{qtype}.gguf")
    compare(lambda: run(model))


def test_gguf_unet_loader_advanced(compare, gguf_nodes):
    (model,) = execute(gguf_nodes["UnetLoaderGGUFAdvanced"], unet_name="tiny_flux_Q8_0.gguf",
                       dequant_dtype="float32", patch_dtype="float32", patch_on_device=False)
    compare(lambda: run(model))


@pytest.mark.parametrize("qtype", ["Q8_0", "F16"])
def test_lora_on_gguf(compare, models, gguf_nodes, qtype):
    """ComfyUI-GGUF applies LoRA while dequantizing (quantized weights) or on load (F16): the ranks'
    clone with the same patches gives the same image, and a different one from the model alone."""
    _, sd = models
    lora = saved(models, "tiny_flux_lora.safetensors", synthetic.lora(sd, rank=4, seed=1, scale=0.1))
    (base,) = execute(gguf_nodes["UnetLoaderGGUF"], unet_name=f"tiny_flux_{qtype}.gguf")
    (model,) = execute(nodes.LoraLoaderModelOnly, model=base, lora_name=lora, strength_model=1.0)
    with_lora, _, _ = compare(lambda: run(model))
    without, _, _ = compare(lambda: run(base))
    assert (with_lora - without).abs().max() > 1e-3


def test_q8_0_blocks_match_the_gguf_package():
    """The bench writes Q8_0 with torch (GPU-fast); the bytes are the gguf package's own quantizer's."""
    gguf = pytest.importorskip("gguf", reason="the gguf package (requirements-test.txt) is not installed")
    w = torch.randn(16, 256) * torch.logspace(-3, 1, 16)[:, None]
    w[0, :32] = 0
    expected = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert (synthetic.q8_0(w).numpy() == expected).all()
