"""The bench's --weights: one FLUX file loaded the way users load quantized FLUX, so that ComfyUI alone
and the plugin's ranks run the same weights: bf16 as stored, fp8 as UNETLoader's `fp8_e4m3fn` does, GGUF
through city96's ComfyUI-GGUF (UnetLoaderGGUF, run as ComfyUI's executor runs it, so the plugin records
the node and the ranks replay it)."""
from __future__ import annotations

import asyncio
import logging
import os
import time

from .. import locate

log = logging.getLogger("comfy_xdit_patch.bench")


def load(kind: str, path: str, workdir: str, device: str, as_bf16: bool = False, arch: str = "flux"):
    """`as_bf16`: a file stored in fp8 (bench_models.stored_dtype) loaded as bf16, as UNETLoader's dtype option
    does; `arch`: the GGUF file's architecture (ComfyUI-GGUF reads it)."""
    import comfy.sd
    import torch

    if kind == "fp8":
        return comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float8_e4m3fn})
    if kind.startswith("gguf-"):
        return gguf(path, kind[5:].upper(), workdir, device, arch)
    return comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.bfloat16} if as_bf16 else {})


def gguf(path: str, qtype: str, workdir: str, device: str, arch: str = "flux"):
    """UnetLoaderGGUF on a GGUF file written once (next to the weights) from `path`'s tensors on `device`."""
    import comfy.utils
    import folder_paths
    import nodes

    from ..driver import models
    from . import synthetic

    package = locate.find_comfyui_gguf()
    if package is None:
        raise SystemExit("--weights gguf-*: ComfyUI-GGUF not found (set COMFYUI_GGUF_PATH to a checkout)")
    name = os.path.splitext(os.path.basename(path))[0] + f"_{qtype}.gguf"
    target = os.path.join(workdir, name)
    if not os.path.exists(target):
        t0 = time.perf_counter()
        sd = {k: v.to(device) for k, v in comfy.utils.load_torch_file(path).items()}
        synthetic.save_gguf(sd, target + ".part", qtype, arch)
        del sd
        os.replace(target + ".part", target)
        log.info("wrote %s in %.0f s", target, time.perf_counter() - t0)
    folder_paths.add_model_folder_path("diffusion_models", workdir)
    if not asyncio.run(nodes.load_custom_node(package)):
        raise SystemExit(f"ComfyUI could not load {package}")
    (patcher,) = models.run_node(nodes.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"], unet_name=name)
    return patcher
