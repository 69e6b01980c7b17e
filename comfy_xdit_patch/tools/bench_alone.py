"""The bench's one-GPU side (tools/bench.py): ComfyUI alone, ComfyUI + TorchCompileModel, with a LoRA, and held to
--gpu-cap as on a smaller card, each timed in this process, which plays ComfyUI's."""
from __future__ import annotations

import time

from . import report


def run(bench, patcher) -> dict:
    """Every one-GPU baseline of the run, in this process; the final latents by (size, cfg) (and ("lora", ...))."""
    import comfy.model_management as mm

    latents = {}
    for size in bench.sizes:
        for cfg in bench.cfgs:
            latents[(size, cfg)] = row(bench, patcher, size, cfg, "ComfyUI alone", {})
            if bench.a.kernel_profile and bench.gpus:
                from .profiling import profiled

                with profiled(bench._profile_prefix(f"alone-{size}-cfg{cfg:g}", "main"), trace=True):
                    bench.sample(patcher, size, cfg, 1)
    if "compiled" in bench.baselines:
        from comfy_extras.nodes_torch_compile import TorchCompileModel

        # ComfyUI + TorchCompileModel (inductor), applied by the node itself: the best one-GPU setup a user
        # has without this plugin. Its first run (compile included) is timed as well.
        compiled = TorchCompileModel.execute(model=patcher, backend="inductor").result[0]
        for size in bench.sizes:
            for cfg in bench.cfgs:
                row(bench, compiled, size, cfg, "ComfyUI + TorchCompileModel", {"compiled": True}, latents)
        mm.unload_all_models()
        del compiled
        mm.soft_empty_cache()
    if bench.a.lora:
        size, cfg = bench.sizes[0], bench.cfgs[0]
        latents[("lora", size, cfg)] = row(bench, bench.with_lora(patcher), size, cfg,
                                           f"ComfyUI alone + LoRA r{bench.a.lora}", {"lora": bench.a.lora})
    if bench.a.gpu_cap:
        capped(bench, patcher, latents)
    mm.unload_all_models()  # the plugin runs reuse this patcher; its weights stay off the GPU
    mm.soft_empty_cache()
    return latents


def row(bench, patcher, size, cfg, label: str, extra: dict, latents: dict | None = None):
    """One baseline row: warm-up, then the timed steps in this process (`latents`: PSNR against eager)."""
    from ..rank.facts import host_memory

    torch = bench.torch
    t0 = time.perf_counter()
    bench.sample(patcher, size, cfg, 2 if extra.get("compiled") else (min(2, bench.a.warmup) or 1))
    first = time.perf_counter() - t0
    if bench.gpus:
        torch.cuda.reset_peak_memory_stats()
    latent, seconds = bench.sample(patcher, size, cfg, bench.a.steps)
    out = {"size": size, "cfg": cfg, **extra, "s_per_step": seconds / bench.a.steps, "first_run_s": first,
           "peak_gib": (torch.cuda.max_memory_allocated() if bench.gpus else 0) / 2**30,
           "rss_peak_gib": host_memory().get("rss_peak", 0) / 2**30}
    if latents is not None:
        out["psnr_db"] = report.psnr(latents[(size, cfg)], latent)
    bench.results["baseline"].append(out)
    print(f"{label} {size} cfg {cfg:g}: {out['s_per_step']:.4f} s/step, peak {out['peak_gib']:.1f} GiB, first "
          f"run {first:.1f} s" + (f", PSNR vs eager {out['psnr_db']:.1f} dB" if latents else ""), flush=True)
    bench._save()
    return latent


def capped(bench, patcher, latents) -> None:
    """ComfyUI alone on a GPU held to --gpu-cap GiB, told so through its own reserve (--reserve-vram), so that
    it offloads as on a card of that size. The cap stays for the plugin runs (the ranks take it too)."""
    import comfy.model_management as mm

    from ..rank.facts import cap_memory

    mm.unload_all_models()
    mm.soft_empty_cache()
    applied = cap_memory(bench.torch, mm, mm.get_torch_device(), bench.a.gpu_cap)  # None on a CPU
    bench.results["gpu_cap"] = {"gib": bench.a.gpu_cap, "applied": applied}
    for size in bench.sizes:
        for cfg in bench.cfgs:
            row(bench, patcher, size, cfg, f"ComfyUI alone capped at {bench.a.gpu_cap:g} GiB",
                {"capped": bench.a.gpu_cap}, latents)
    mm.unload_all_models()
    mm.soft_empty_cache()
