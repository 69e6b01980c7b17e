"""The command line of `comfy-xdit bench` (tools/bench.py)."""
from __future__ import annotations

import argparse


def parse(argv, description: str = ""):
    ap = argparse.ArgumentParser(prog="comfy-xdit bench", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024,2048")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=12, help="steps before timing (the chunk tuner needs <= 9)")
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
    ap.add_argument("--checkpoint", help="a FLUX diffusion-model file instead of synthetic weights")
    ap.add_argument("--baselines", help="one-GPU baselines: eager (ComfyUI alone) and/or compiled (ComfyUI + its "
                                        "TorchCompileModel node, inductor); default eager,compiled on GPU, eager on CPU")
    ap.add_argument("--weights", default="bf16", choices=("bf16", "fp8", "gguf-q8_0", "gguf-f16"),
                    help="how the model is loaded, the same for ComfyUI alone and the plugin: fp8 = UNETLoader's "
                         "fp8_e4m3fn; gguf-* = ComfyUI-GGUF's UnetLoaderGGUF on a GGUF file written from the "
                         "synthetic weights (needs COMFYUI_GGUF_PATH or ComfyUI/custom_nodes/ComfyUI-GGUF)")
    ap.add_argument("--workdir", default="/tmp/comfy_xdit_bench")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--tiny", action="store_true", help="tiny FLUX on CPU ranks (a smoke test of this script)")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile ComfyUI's process and rank 0's serving loop over the first timed run")
    ap.add_argument("--kernel-profile", action="store_true",
                    help="torch.profiler tables of one step, ComfyUI alone and each rank, into OUT/profile")
    return ap.parse_args(argv)
