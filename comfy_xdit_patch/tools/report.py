"""The benchmark's numbers as a reader sees them: PSNR against a reference, the Markdown table."""
from __future__ import annotations

import math


def psnr(ref, out) -> float:
    mse = float(((ref - out) ** 2).mean())
    span = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * math.log10(span * span / mse)


def baseline(results: dict, size: int, cfg: float, compiled: bool = False, lora: bool = False) -> dict | None:
    """The one-GPU row for this case: ComfyUI alone, or ComfyUI + TorchCompileModel (compiled)."""
    return next((b for b in results["baseline"] if b["size"] == size and b["cfg"] == cfg
                 and bool(b.get("lora")) == lora and bool(b.get("compiled")) == compiled), None)


def _x(ratio) -> str:
    return f"{ratio:.2f}×" if ratio else ""


def table(results: dict) -> str:
    """Every row against both one-GPU baselines (ComfyUI alone; ComfyUI + TorchCompileModel)."""
    gpu = (results["machine"]["gpus"] or ["CPU"])[0]
    weights = results["args"].get("weights", "bf16")
    gpu += f", {weights}" if weights != "bf16" else ""
    rows = ["| machine | size | cfg | ranks | layout | s/step | vs alone | vs compiled | compute | a2a | dispatch "
            "| PSNR vs alone | peak/GPU |", "|" + "---|" * 13]
    for b in results["baseline"]:
        alone = baseline(results, b["size"], b["cfg"], lora=bool(b.get("lora")))
        label = "ComfyUI + TorchCompileModel" if b.get("compiled") else "ComfyUI alone"
        label += f" + LoRA r{b['lora']}" if b.get("lora") else ""
        vs_compiled = 1.0 if b.get("compiled") else None
        quality = f"{b['psnr_db']:.1f} dB" if "psnr_db" in b else ""
        rows.append(f"| {gpu} | {b['size']}² | {b['cfg']:g} | 1 | {label} | {b['s_per_step']:.3f} "
                    f"| {_x(alone['s_per_step'] / b['s_per_step'])} | {_x(vs_compiled)} | | | | {quality} "
                    f"| {b['peak_gib']:.1f} GiB |")
    for r in results["runs"]:
        rows.append(f"| {gpu} | {r['size']}² | {r['cfg']:g} | {r['workers']} | {r['label']} | {r['s_per_step']:.3f} "
                    f"| {_x(r['speedup'])} | {_x(r.get('speedup_vs_compiled'))} | {r['compute_s'] * 1e3:.1f} ms "
                    f"| {r['a2a_s'] * 1e3:.1f} ms | {r['dispatch_s'] * 1e3:.2f} ms | {r['psnr_db']:.1f} dB "
                    f"| {max(r['peak_gib']):.1f} GiB |")
    return "\n".join(rows)
