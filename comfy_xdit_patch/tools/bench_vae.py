"""The VAE decode timed apart: ComfyUI's own decode against the ranks' decode by rows (driver/decode.py), one run.

    comfy-xdit bench-vae [--vae flux|wan2.1] [--sizes 2048,4096 | 480p,720p] [--frames 81] [--ranks 2,4]
                         [--repeats 3] [--tiny] [--out DIR]

A VAE with the released decoder's shapes and random weights (FLUX's KL VAE: 128 base channels; Wan 2.1's: 96) is
written to --workdir and loaded by ComfyUI's VAELoader, as a workflow loads it. Each size: ComfyUI's decode in this
process (seconds, peak memory), then the plugin attached with each rank count and every decode let through
(COMFY_XDIT_VAE_MIN_PIXELS=0): seconds, each rank's peak, PSNR against ComfyUI's image. `--tiny`: the same on CPU
with a small decoder (a smoke test).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from .. import config as cfgmod
from .. import locate
from . import report

SIZES = {"480p": (832, 480), "720p": (1280, 720)}


def parse(argv):
    p = argparse.ArgumentParser(prog="comfy-xdit bench-vae", description=__doc__.splitlines()[0])
    p.add_argument("--vae", choices=("flux", "wan2.1"), default="flux")
    p.add_argument("--sizes", help="square sizes (flux) or 480p / 720p (wan2.1); default 2048 / 480p")
    p.add_argument("--frames", type=int, default=81, help="video frames (wan2.1)")
    p.add_argument("--ranks", default="2")
    p.add_argument("--repeats", type=int, default=3, help="timed decodes after one warm-up, per setup")
    p.add_argument("--tiny", action="store_true", help="CPU, a small decoder: a smoke test")
    p.add_argument("--workdir", default=os.path.expanduser("~/.cache/comfy_xdit_patch/bench"))
    p.add_argument("--out", default="bench-vae")
    a = p.parse_args(argv)
    a.sizes = a.sizes or ("96" if a.tiny and a.vae == "flux" else "2048" if a.vae == "flux" else "480p")
    return a


def vae_file(a) -> str:
    """The synthetic VAE, in a folder ComfyUI's VAELoader lists."""
    import folder_paths

    from . import synthetic, synthetic_wan

    folder = os.path.join(a.workdir, "vae")
    name = f"bench_{a.vae}{'_tiny' if a.tiny else ''}.safetensors"
    if not os.path.exists(os.path.join(folder, name)):
        os.makedirs(folder, exist_ok=True)
        sd = (synthetic.kl_vae(ch=32 if a.tiny else 128, seed=0) if a.vae == "flux"
              else synthetic_wan.tiny_wan_vae(dim=8 if a.tiny else 96, seed=0))
        synthetic.save(sd, os.path.join(folder, name))
    folder_paths.add_model_folder_path("vae", folder)
    return name


def latent(a, size, torch):
    width, height = SIZES[size] if size in SIZES else (int(size), int(size))
    if a.vae == "wan2.1":
        frames = (a.frames - 1) // 4 + 1
        if a.tiny:
            frames, width, height = 3, width // 16, height // 16
        shape = (1, 16, frames, height // 8, width // 8)
    else:
        shape = (1, 16, height // 8, width // 8)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def timed(decode, repeats: int, torch, gpu: bool):
    """(image, seconds per decode, peak GiB of this process's GPU) after one warm-up decode; in inference mode,
    as ComfyUI's executor runs its nodes (its tiled fallback post-processes its output in place)."""
    decode = torch.inference_mode()(decode)
    image = decode()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(repeats):
        image = decode()
    if gpu:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0
    return image, (time.perf_counter() - t0) / repeats, peak


def main(argv=None) -> int:
    a = parse(argv)
    locate.import_comfy(cpu=True if a.tiny else None)
    import nodes
    import torch

    from ..driver import patch
    from ..driver.models import run_node

    gpus = 0 if a.tiny else cfgmod.visible_gpus()
    (vae,) = run_node(nodes.VAELoader, vae_name=vae_file(a))  # as ComfyUI's executor runs it: the ranks can load it
    results = {"vae": a.vae, "args": vars(a), "rows": []}
    os.makedirs(a.out, exist_ok=True)
    for size in a.sizes.split(","):
        x = latent(a, size, torch)
        alone, base, peak = timed(lambda: vae.decode(x), a.repeats, torch, bool(gpus))
        results["rows"].append({"size": size, "setup": "ComfyUI alone", "s": base, "peak_gib": [peak], "psnr_db": None})
        print(f"{size} {tuple(x.shape)} ComfyUI alone: {base:.3f} s, peak {peak:.2f} GiB", flush=True)
        for n in (int(r) for r in a.ranks.split(",")):
            config = cfgmod.load({"COMFY_XDIT": "1", "COMFY_XDIT_WORKERS": str(n), "COMFY_XDIT_PRESTART": "0",
                                  "COMFY_XDIT_VAE_MIN_PIXELS": "0"}, gpus=gpus)
            router = patch.install(config)
            try:
                group = router.life.get()  # a decode never starts a group; a sampling run would have
                before = router.stats["routed_decodes"]
                image, seconds, _ = timed(lambda: vae.decode(x), a.repeats, torch, bool(gpus))
                routed = router.stats["routed_decodes"] - before
                stats = group.stats()
                row = {"size": size, "setup": f"{n} ranks", "s": seconds, "routed": routed,
                       "peak_gib": [s["memory_peak"] / 2**30 for s in stats], "speedup": base / seconds,
                       "psnr_db": report.psnr(alone.float(), image.float())}
            finally:
                patch.uninstall()
            results["rows"].append(row)
            print(f"{size} {n} ranks: {seconds:.3f} s (x{row['speedup']:.2f}), decodes on the ranks {routed} of "
                  f"{a.repeats + 1}, peak/rank {max(row['peak_gib']):.2f} GiB, PSNR {row['psnr_db']:.1f} dB", flush=True)
    with open(os.path.join(a.out, "bench-vae.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return 0 if all(r.get("routed", a.repeats + 1) == a.repeats + 1 for r in results["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
