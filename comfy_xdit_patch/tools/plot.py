"""The benchmark's PNG: speed-up against ranks, one line per image size (PIL only, no matplotlib)."""
from __future__ import annotations


def speedups(results: dict, path: str) -> None:
    """Speed-up against ranks, one line per size, into the PNG at `path`."""
    from PIL import Image, ImageDraw

    # the --ranks rows (auto layout, the run's settings), not --layouts / --variants / LoRA rows
    runs = [r for r in results["runs"] if r["label"].startswith("auto,") and r["cfg"] == 1 and not r.get("lora")]
    if not runs:
        return
    w, h, m = 640, 420, 50
    top = max(max(r["workers"] for r in runs), max(r["speedup"] for r in runs))
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    sx = lambda n: m + (w - 2 * m) * n / top  # noqa: E731
    sy = lambda s: h - m - (h - 2 * m) * s / top  # noqa: E731
    d.line([(m, h - m), (w - m, h - m)], fill="black")
    d.line([(m, h - m), (m, m)], fill="black")
    d.line([(sx(0), sy(0)), (sx(top), sy(top))], fill=(200, 200, 200))
    for i in range(1, int(top) + 1):
        d.text((sx(i) - 3, h - m + 5), str(i), fill="black")
        d.text((m - 20, sy(i) - 6), f"{i}x", fill="black")
    colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44)]
    for i, size in enumerate(sorted({r["size"] for r in runs}, key=str)):
        pts = sorted((r["workers"], r["speedup"]) for r in runs if r["size"] == size)
        if pts[0][0] != 1:  # ComfyUI alone is 1x at 1 GPU; a 1-rank row of the plugin has its own point
            pts.insert(0, (1, 1.0))
        d.line([(sx(n), sy(s)) for n, s in pts], fill=colors[i % 3], width=3)
        d.text((w - m - 120, m + 16 * i), f"{size}x{size}" if isinstance(size, int) else size, fill=colors[i % 3])
    gpu = (results["machine"]["gpus"] or ["CPU"])[0]
    d.text((m, 15), f"speed-up vs ComfyUI alone on 1 GPU, cfg 1 ({len(results['machine']['gpus'])}x {gpu})",
           fill="black")
    d.text((w // 2 - 20, h - 20), "ranks", fill="black")
    img.save(path)
