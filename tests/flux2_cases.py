"""FLUX.2 workflows as a table, one line per case: (layout, workflow) -> a function of the loaded model that
returns the final latent. test_flux2.py runs them on the session's ranks, test_weights.py with the weights
sharded across 2 and 3 ranks."""
from __future__ import annotations

import nodes
import torch
from comfy_extras import nodes_edit_model, nodes_flux

import tiny
from conftest import ksample, node

LAYOUTS = ("dev", "klein")  # klein: no guidance embedding
LORA = "tiny_flux2_{layout}_lora.safetensors"


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


def t2i(model, layout, cfg=1.0, refs=(), batch=1):
    return ksample(model, conditioning(layout, 1, refs), conditioning(layout, 2), latent(batch=batch), cfg=cfg)


def with_lora(model, layout, strength=1.0):
    (patched,) = node(nodes.LoraLoaderModelOnly, model=model, lora_name=LORA.format(layout=layout),
                      strength_model=strength)
    return t2i(patched, layout)


# workflow -> fn(model, layout); multi-reference: two references of other sizes than the 64 x 48 image
WORKFLOWS = {
    "text_to_image": t2i,
    "cfg": lambda model, layout: t2i(model, layout, cfg=3.5),
    "multi_reference": lambda model, layout: t2i(model, layout, refs=((32, 48), (64, 32))),
    "multi_reference_cfg": lambda model, layout: t2i(model, layout, cfg=2.5, refs=((48, 48), (32, 16))),
    "lora": with_lora,
}
CASES = [(layout, name) for layout in LAYOUTS for name in WORKFLOWS]


def make_lora(folder: str, model_file: str, layout: str) -> None:
    import os

    import comfy.utils
    import folder_paths

    from comfy_xdit_patch.tools import synthetic

    folder_paths.add_model_folder_path("loras", folder)
    path = os.path.join(folder, LORA.format(layout=layout))
    if not os.path.exists(path):
        sd = comfy.utils.load_torch_file(model_file)
        synthetic.save(synthetic.lora(sd, rank=4, seed=3, scale=0.1), path)


def execute(cls, **inputs):
    """A loader node's outputs, run the way ComfyUI's executor runs it (where the plugin records loader nodes)."""
    import asyncio

    import execution

    output, _, _, pending = asyncio.run(execution.get_output_data(None, "1", cls(), {k: [v] for k, v in inputs.items()}))
    assert not pending
    return tuple(o[0] for o in output)


def quantized_files(folder: str, model_file: str, layout: str, gguf: bool) -> dict:
    """The tiny FLUX.2 as the files people run: fp8 mixed precision (comfy_quant, like flux2_dev_fp8mixed) and,
    with ComfyUI-GGUF, Q8_0 / Q4_K GGUF. name -> file name in `folder` (registered for diffusion models)."""
    import os

    import comfy.utils
    import folder_paths

    from comfy_xdit_patch.tools import synthetic

    folder_paths.add_model_folder_path("diffusion_models", folder)
    sd = comfy.utils.load_torch_file(model_file)
    names = {"fp8mixed": f"tiny_flux2_{layout}_fp8mixed.safetensors"}
    if not os.path.exists(os.path.join(folder, names["fp8mixed"])):
        synthetic.save(synthetic.scaled_fp8(sd, "comfy_quant"), os.path.join(folder, names["fp8mixed"]))
    for qtype in ("Q8_0", "Q4_K") if gguf else ():
        names[qtype] = f"tiny_flux2_{layout}_{qtype}.gguf"
        if not os.path.exists(os.path.join(folder, names[qtype])):
            synthetic.save_gguf(sd, os.path.join(folder, names[qtype]), qtype)
    return names
