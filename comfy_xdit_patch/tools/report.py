"""The benchmark's numbers as a reader sees them: PSNR against a reference, the Markdown table."""
from __future__ import annotations

import math


def psnr(ref, out) -> float:
    mse = float(((ref - out) ** 2).mean())
    span = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * math.log10(span * span / mse)


def baseline(results: dict, size, cfg: float, compiled: bool = False, lora: bool = False,
             capped: bool = False) -> dict | None:
    """The one-GPU row for this case: ComfyUI alone, + TorchCompileModel (compiled), or held to --gpu-cap (capped)."""
    return next((b for b in results["baseline"] if b["size"] == size and b["cfg"] == cfg
                 and bool(b.get("lora")) == lora and bool(b.get("compiled")) == compiled
                 and bool(b.get("capped")) == capped), None)


def _x(ratio) -> str:
    return f"{ratio:.2f}×" if ratio else ""


def _size(size, results: dict) -> str:
    """A row's size: 1024², or a video's "480p × 81"."""
    frames = results["args"].get("frames") if results["args"].get("model", "").startswith("wan") else None
    text = f"{size}²" if isinstance(size, int) else str(size)
    return f"{text} × {frames}" if frames else text


def table(results: dict) -> str:
    """Every row against the one-GPU baselines (ComfyUI alone; + TorchCompileModel; held to --gpu-cap)."""
    gpu = (results["machine"]["gpus"] or ["CPU"])[0]
    weights = results["args"].get("weights", "bf16")
    gpu += f", {results['args'].get('model', 'flux1-dev')}" + (f", {weights}" if weights != "bf16" else "")
    rows = ["| machine | size | cfg | ranks | layout | s/step | vs alone | vs compiled | vs capped | compute | a2a "
            "| dispatch | PSNR vs alone | peak/GPU | peak RSS/rank |", "|" + "---|" * 15]
    for b in results["baseline"]:
        alone = baseline(results, b["size"], b["cfg"], lora=bool(b.get("lora")))
        label = "ComfyUI + TorchCompileModel" if b.get("compiled") else "ComfyUI alone"
        label += f" + LoRA r{b['lora']}" if b.get("lora") else ""
        label += f" capped at {b['capped']:g} GiB" if b.get("capped") else ""
        vs_compiled = 1.0 if b.get("compiled") else None
        vs_capped = 1.0 if b.get("capped") else None
        quality = f"{b['psnr_db']:.1f} dB" if "psnr_db" in b else ""
        rows.append(f"| {gpu} | {_size(b['size'], results)} | {b['cfg']:g} | 1 | {label} | {b['s_per_step']:.3f} "
                    f"| {_x(alone['s_per_step'] / b['s_per_step'])} | {_x(vs_compiled)} | {_x(vs_capped)} | | | "
                    f"| {quality} | {b['peak_gib']:.1f} GiB | {b.get('rss_peak_gib', 0):.1f} GiB |")
    for r in results["runs"]:
        rss = max(r.get("rank_rss_peak_gib") or [0])
        rows.append(f"| {gpu} | {_size(r['size'], results)} | {r['cfg']:g} | {r['workers']} | {r['label']} "
                    f"| {r['s_per_step']:.3f} | {_x(r['speedup'])} | {_x(r.get('speedup_vs_compiled'))} "
                    f"| {_x(r.get('speedup_vs_capped'))} | {r['compute_s'] * 1e3:.1f} ms | {r['a2a_s'] * 1e3:.1f} ms "
                    f"| {r['dispatch_s'] * 1e3:.2f} ms | {r['psnr_db']:.1f} dB | {max(r['peak_gib']):.1f} GiB "
                    f"| {rss:.1f} GiB |")
    return "\n".join(rows)
