"""The default job: a FLUX text-to-image workflow through ComfyUI headless, plugin off and on.

Whatever the hardware: a user's FLUX checkpoint if given; otherwise synthetic weights with
FLUX.1-dev's exact shapes on GPUs, and a tiny FLUX on a CPU-only machine. Prints the time of the
same workflow with ComfyUI alone (one GPU) and with the plugin, and where the images were saved.
"""
from __future__ import annotations

import os

import numpy as np

from .. import config, locate
from . import headless, synthetic


def _place(src: str, folder: str) -> str:
    name = os.path.basename(src)
    dst = os.path.join(folder, name)
    if not os.path.lexists(dst):
        os.symlink(os.path.abspath(src), dst)
    return name


def _models(base: str, args, gpus: int) -> tuple[dict, str]:
    """(workflow arguments, description)."""
    if args.checkpoint:
        return {"checkpoint": _place(args.checkpoint, os.path.join(base, "models/checkpoints"))}, args.checkpoint
    vae = "xdit_demo_taesd16.safetensors"
    vae_path = os.path.join(base, "models/vae", vae)
    if not os.path.exists(vae_path):
        synthetic.save(synthetic.taesd_vae(16), vae_path)
    if args.unet:
        return {"unet": _place(args.unet, os.path.join(base, "models/diffusion_models")), "vae": vae}, args.unet
    if gpus:
        name = "xdit_demo_flux1_dev_synthetic.safetensors"
        path = os.path.join(base, "models/diffusion_models", name)
        if not os.path.exists(path):
            import torch

            print(f"writing synthetic FLUX.1-dev weights (24 GB, bf16) to {path} ...", flush=True)
            sd = synthetic.flux_dev("cuda")
            synthetic.save({k: v.cpu() for k, v in sd.items()}, path + ".part")
            del sd
            torch.cuda.empty_cache()
            os.replace(path + ".part", path)
        return {"unet": name, "vae": vae}, "synthetic FLUX.1-dev (random bf16 weights, real shapes)"
    name = "xdit_demo_tiny_flux.safetensors"
    path = os.path.join(base, "models/diffusion_models", name)
    if not os.path.exists(path):
        synthetic.save(synthetic.tiny_flux(heads=2, depth=2, single=4), path)
    return ({"unet": name, "vae": vae, "context_dim": synthetic.TINY_CONTEXT_DIM},
            "tiny FLUX (CPU-only machine: 2 heads, 2+4 blocks)")


def run(args) -> int:
    comfy = locate.import_comfy()
    import torch

    gpus = config.visible_gpus()
    base = os.path.abspath(os.path.expanduser(args.workdir))
    headless.prepare_base(base, locate.CHECKOUT)
    models, what = _models(base, args, gpus)
    size = args.size or (1024 if gpus or args.checkpoint else 256)
    steps = args.steps or (20 if gpus else 8)
    hardware = f"{gpus} GPU(s): {torch.cuda.get_device_name(0)}" if gpus else "no GPU (ranks on CPU over gloo)"
    print(f"ComfyUI {comfy}\nmodel: {what}\n{size}x{size}, {steps} steps, euler/simple, {hardware}", flush=True)
    env_on = {"COMFY_XDIT": "1"}
    if not gpus:
        env_on["COMFY_XDIT_WORKERS"] = str(args.workers or 2)
    elif args.workers:
        env_on["COMFY_XDIT_WORKERS"] = str(args.workers)
    runs = {}
    for label, env, prefix in (("ComfyUI alone", {"COMFY_XDIT": "0"}, "xdit_demo_off"),
                               ("with comfy_xdit_patch", env_on, "xdit_demo_on")):
        with headless.Server(comfy, base, env=env, cpu=not gpus) as server:
            first = server.run(headless.flux_workflow(size, size, steps, seed=args.seed, prefix=prefix, **models))
            # warm: model loaded, worker group up (a new seed, or ComfyUI would serve its cache)
            again = server.run(headless.flux_workflow(size, size, steps, seed=args.seed + 1, prefix=prefix, **models))
        runs[label] = (first, again)
        print(f"  {label:<24} first run {first['seconds']:7.2f} s   warm run {again['seconds']:7.2f} s", flush=True)
    (off1, off2), (on1, on2) = runs.values()
    from PIL import Image

    a, b = (np.asarray(Image.open(r["images"][0])).astype(np.int16) for r in (off1, on1))
    print(f"speed-up (warm): {off2['seconds'] / on2['seconds']:.2f}x  |  max pixel difference: {np.abs(a - b).max()}")
    print(f"images: {off1['images'][0]}\n        {on1['images'][0]}")
    return 0
