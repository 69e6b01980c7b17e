"""The command line of `comfy-xdit bench` (tools/bench.py)."""
from __future__ import annotations

import argparse

from .bench_models import MODELS, size


def parse(argv, description: str = ""):
    ap = argparse.ArgumentParser(prog="comfy-xdit bench", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flux1-dev", choices=sorted(MODELS),
                    help="synthetic weights with the model's real key names and shapes (tools/bench_models.py)")
    ap.add_argument("--sizes", help="image sizes: N (square), WxH, 480p, 720p; default: the model's (FLUX.1 "
                                    "1024,2048; FLUX.2 1024; Wan 480p,720p)")
    ap.add_argument("--frames", type=int, default=81, help="Wan: video length in frames (latent: (F - 1) / 4 + 1)")
    ap.add_argument("--short", action="store_true", help="Wan: a short clip of 17 frames, for quick runs")
    ap.add_argument("--steps", type=int, help="timed steps (default 20; Wan 3)")
    ap.add_argument("--warmup", type=int, help="steps before timing (default 12, the chunk tuner needs <= 9; Wan 1)")
    ap.add_argument("--gpu-cap", type=float, metavar="GB",
                    help="hold every process to GB GiB of its GPU (torch's per-process memory fraction) and tell "
                         "ComfyUI so through its reserve (--reserve-vram: total - GB more), as on a card of that "
                         "size; adds the baseline ComfyUI alone capped, and the ranks take the same cap "
                         "(COMFY_XDIT_GPU_CAP)")
    ap.add_argument("--store", default="auto", choices=("auto", "bf16", "fp8"),
                    help="how the synthetic file stores its matrices; auto: bf16 where the disk holds it, else fp8 "
                         "(--weights bf16 then loads it as bf16: the same compute)")
    ap.add_argument("--ranks", help="rank counts to run with auto layout (default: 1, 2 and every GPU)")
    ap.add_argument("--layouts", default="", help="forced layouts, ';'-separated, e.g. 'ulysses=2,ring=2'")
    ap.add_argument("--cfg", default="1", help="CFG scales, e.g. 1,3.5 (CFG > 1 batches cond and uncond)")
    ap.add_argument("--cfg-ranks", default="", help="rank counts that run every --cfg value (others: the first)")
    ap.add_argument("--lora", type=int, default=0, help="also time a synthetic LoRA of this rank at 2 ranks")
    ap.add_argument("--env", default="", help="extra COMFY_XDIT_* settings for the plugin runs, ';'-separated")
    ap.add_argument("--variants", default="",
                    help="'|'-separated extra --env sets, run at 2 ranks or at N with an 'N:' prefix "
                         "(e.g. '4:COMFY_XDIT_EXCHANGE=collective'; compute without any exchange, wrong images: "
                         "'2:COMFY_XDIT_DIAG_LOOPBACK=1')")
    ap.add_argument("--checkpoint", help="a diffusion-model file of --model's kind instead of synthetic weights")
    ap.add_argument("--baselines", help="one-GPU baselines: eager (ComfyUI alone) and/or compiled (ComfyUI + its "
                                        "TorchCompileModel node, inductor); default eager,compiled on GPU, eager on CPU")
    ap.add_argument("--weights", default="bf16", choices=("bf16", "fp8", "gguf-q8_0", "gguf-f16"),
                    help="how the model is loaded, the same for ComfyUI alone and the plugin: fp8 = UNETLoader's "
                         "fp8_e4m3fn; gguf-* = ComfyUI-GGUF's UnetLoaderGGUF on a GGUF file written from the "
                         "synthetic weights (needs COMFYUI_GGUF_PATH or ComfyUI/custom_nodes/ComfyUI-GGUF)")
    ap.add_argument("--workdir", default="/tmp/comfy_xdit_bench")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--tiny", action="store_true", help="a tiny model of --model's family on CPU ranks (a smoke test)")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile ComfyUI's process and rank 0's serving loop over the first timed run")
    ap.add_argument("--kernel-profile", action="store_true",
                    help="torch.profiler tables of one step, ComfyUI alone and each rank, into OUT/profile")
    a = ap.parse_args(argv)
    wan = MODELS[a.model].family == "wan"
    a.sizes = a.sizes or ("64" if a.tiny and not wan else "32x48" if a.tiny else MODELS[a.model].sizes)
    a.frames = 17 if a.short else (5 if a.tiny and wan and a.frames == 81 else a.frames)
    a.steps = a.steps if a.steps is not None else (3 if wan else 20)
    a.warmup = a.warmup if a.warmup is not None else (1 if wan else 12)
    for label in a.sizes.split(","):
        try:
            size(label)
        except ValueError as e:
            ap.error(f"--sizes: {e}")
    if a.weights.startswith("gguf") and wan:
        ap.error("--weights gguf-*: FLUX models only")
    return a
