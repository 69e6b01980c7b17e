"""FLUX.2 workflows as a table, one line per case: (layout, workflow) -> a function of the loaded model (and the
name of a LoRA made for its file) that returns the final latent. test_flux2.py runs them on the session's ranks,
test_weights.py with the weights sharded across 2 and 3 ranks."""
from __future__ import annotations

import torch

from conftest import ksample, node  # noqa: I001  (first: it sets ComfyUI's CPU mode, also in spawned ranks)
import nodes
from comfy_extras import nodes_edit_model, nodes_flux

import tiny

LAYOUTS = ("dev", "klein")  # klein: no guidance embedding


def latent(w: int = 64, h: int = 48, batch: int = 1) -> dict:
    (out,) = node(nodes_flux.EmptyFlux2LatentImage, width=w, height=h, batch_size=batch)
    return out  # 128 channels at size / 16


def conditioning(layout: str, seed: int, refs: tuple = ()):
    """Text features (ComfyUI pads them to 512 tokens), guidance for [dev], and reference latents of the given
    pixel sizes (ReferenceLatent once per image, then the `index` method, FLUX.2's default, set explicitly)."""
    cond = tiny.conditioning(seed, guidance=3.5 if layout == "dev" else None)
    g = torch.Generator().manual_seed(seed + 100)
    for w, h in refs:
        ref = {"samples": torch.randn(1, 128, h // 16, w // 16, generator=g)}
        (cond,) = node(nodes_edit_model.ReferenceLatent, conditioning=cond, latent=ref)
    if refs:
        (cond,) = node(nodes_flux.FluxKontextMultiReferenceLatentMethod, conditioning=cond,
                       reference_latents_method="index")
    return cond


def t2i(model, layout, lora=None, cfg=1.0, refs=(), batch=1):
    return ksample(model, conditioning(layout, 1, refs), conditioning(layout, 2), latent(batch=batch), cfg=cfg)


def with_lora(model, layout, lora, strength=1.0):
    (patched,) = node(nodes.LoraLoaderModelOnly, model=model, lora_name=lora, strength_model=strength)
    return t2i(patched, layout)


# workflow -> fn(model, layout, lora); multi-reference: two references of other sizes than the 64 x 48 image
WORKFLOWS = {
    "text_to_image": t2i,
    "cfg": lambda model, layout, lora: t2i(model, layout, cfg=3.5),
    "multi_reference": lambda model, layout, lora: t2i(model, layout, refs=((32, 48), (64, 32))),
    "multi_reference_cfg": lambda model, layout, lora: t2i(model, layout, cfg=2.5, refs=((48, 48), (32, 16))),
    "lora": with_lora,
}
CASES = [(layout, name) for layout in LAYOUTS for name in WORKFLOWS]


def make_lora(folder: str, model_file: str, seed: int = 3) -> str:
    """A LoRA for `model_file`'s layers, in ComfyUI's lora folder: its name."""
    import os

    import comfy.utils
    import folder_paths

    from comfy_xdit_patch.tools import synthetic

    folder_paths.add_model_folder_path("loras", folder)
    name = f"{os.path.basename(model_file).rsplit('.', 1)[0]}_lora{seed}.safetensors"
    if not os.path.exists(os.path.join(folder, name)):
        sd = comfy.utils.load_torch_file(model_file)
        synthetic.save(synthetic.lora(sd, rank=4, seed=seed, scale=0.1), os.path.join(folder, name))
    return name


def execute(cls, **inputs):
    """A loader node's outputs, run the way ComfyUI's executor runs it (where the plugin records loader nodes)."""
    import asyncio

    import execution

    body = {k: [v] for k, v in inputs.items()}
    output, _, _, pending = asyncio.run(execution.get_output_data(None, "1", cls(), body))
    assert not pending
    return tuple(o[0] for o in output)


def quantized_files(folder: str, model_file: str, gguf: bool) -> dict:
    """`model_file` as the files people run: fp8 mixed precision (comfy_quant, like flux2_dev_fp8mixed) and, with
    ComfyUI-GGUF, Q8_0 / Q4_K GGUF. kind -> file name in `folder` (registered for diffusion models)."""
    import os

    import comfy.utils
    import folder_paths

    from comfy_xdit_patch.tools import synthetic

    folder_paths.add_model_folder_path("diffusion_models", folder)
    base = os.path.basename(model_file).rsplit(".", 1)[0]
    sd = comfy.utils.load_torch_file(model_file)
    names = {"fp8mixed": f"{base}_fp8mixed.safetensors"}
    if not os.path.exists(os.path.join(folder, names["fp8mixed"])):
        synthetic.save(synthetic.scaled_fp8(sd, "comfy_quant"), os.path.join(folder, names["fp8mixed"]))
    for qtype in ("Q8_0", "Q4_K") if gguf else ():
        names[qtype] = f"{base}_{qtype}.gguf"
        if not os.path.exists(os.path.join(folder, names[qtype])):
            synthetic.save_gguf(sd, os.path.join(folder, names[qtype]), qtype)
    return names


def load(kind: str, model_file: str, folder: str, gguf_loader=None):
    """The tiny FLUX.2 through a stock loader: "fp8_e4m3fn" (UNETLoader storing fp8), "fp8mixed", "Q8_0",
    "Q4_K" (ComfyUI-GGUF's UnetLoaderGGUF). Run under inference mode, as ComfyUI's executor runs nodes."""
    import os

    names = quantized_files(folder, model_file, gguf=gguf_loader is not None)
    if kind == "fp8_e4m3fn":
        (model,) = execute(nodes.UNETLoader, unet_name=os.path.basename(model_file), weight_dtype="fp8_e4m3fn")
    elif kind == "fp8mixed":
        (model,) = execute(nodes.UNETLoader, unet_name=names[kind], weight_dtype="default")
    else:
        (model,) = execute(gguf_loader, unet_name=names[kind])
    assert type(model.model).__name__ == "Flux2"
    return model


def gguf_loader():
    """ComfyUI-GGUF's UnetLoaderGGUF, loaded as ComfyUI loads custom nodes; None where there is no checkout."""
    import asyncio
    import importlib.util

    from comfy_xdit_patch import locate

    path = locate.find_comfyui_gguf()
    if path is None or importlib.util.find_spec("gguf") is None:
        return None
    if "UnetLoaderGGUF" not in nodes.NODE_CLASS_MAPPINGS:
        assert asyncio.run(nodes.load_custom_node(path))
    return nodes.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]
