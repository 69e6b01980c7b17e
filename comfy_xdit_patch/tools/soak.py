"""Soak: many prompts in a row on one ComfyUI server with the plugin on (mixed sizes, LoRA on and off,
cfg 1 and 3.5); after each, the resident memory of ComfyUI's process and of each rank, their open file
descriptors, the shared-memory segments they hold and, on GPUs, each rank's GPU memory (nvidia-smi: the
rank's process, or each GPU where the container hides the pids).
Growth from prompt 10 to the last must stay within 2 %.

    python -m comfy_xdit_patch.tools.soak --prompts 50 --out docs/soak.md          (CPU ranks)
    python -m comfy_xdit_patch.tools.soak --prompts 50 --gpu --out docs/soak-gpu.md (GPU ranks)
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time

from .. import config, locate
from . import faults, headless, procs

SIZES = (96, 128, 160)
LIMIT = 0.02  # growth allowed from prompt 10 to the last


def _smi(query: str) -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    return [[x.strip() for x in line.split(",")] for line in out.splitlines() if line.strip()]


def gpu_mib(ranks: list[int]) -> list[float]:
    """GPU memory (MiB) each rank's process holds, from nvidia-smi; where the rank pids aren't visible
    to it (a container's own pid namespace), each GPU's memory in use instead. [] without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return []
    per_pid: dict[int, float] = {}
    for pid, mib in _smi("compute-apps=pid,used_memory"):
        per_pid[int(pid)] = per_pid.get(int(pid), 0.0) + float(mib)
    if any(p in per_pid for p in ranks):
        return [per_pid.get(p, 0.0) for p in ranks]
    return [float(mib) for _, mib in _smi("gpu=index,memory.used")]


def sample(root: int) -> dict:
    ranks = procs.ranks(root)
    mine = [root] + ranks
    shm = procs.shm_segments() & set().union(*(_mapped(p) for p in mine))
    return {"comfy_rss": procs.rss_mib(root), "rank_rss": [procs.rss_mib(p) for p in ranks],
            "fds": sum(procs.open_fds(p) for p in mine), "shm": len(shm), "ranks": ranks, "gpu": gpu_mib(ranks)}


def _mapped(pid: int) -> set[str]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return {line.rsplit("/", 1)[1].strip() for line in f if "/dev/shm/psm_" in line}
    except OSError:
        return set()


def plan(n: int) -> list[dict]:
    """Prompt i: size, LoRA and cfg cycle with different periods, so every combination recurs."""
    return [{"size": SIZES[i % 3], "lora": 1.0 if i % 2 else None, "cfg": 3.5 if (i // 2) % 2 else 1.0,
             "seed": 100 + i, "steps": 4} for i in range(n)]


def growth(rows: list[dict], key) -> float:
    first, last = key(rows[min(9, len(rows) - 1)]), key(rows[-1])
    return (last - first) / first if first else 0.0


def soak(base_dir: str, n: int, gpu: bool) -> tuple[str, bool]:
    comfyui = locate.import_comfy(cpu=not gpu)
    faults.prepare(base_dir)
    # a GPU rank's first call of each size compiles its blocks (15-25 s): the default call timeout
    env = dict({k: v for k, v in faults.ENV.items() if k != "XDIT_TEST_PAUSE"}, COMFY_XDIT_TIMEOUT="120")
    if gpu:  # 2 ranks where 2 GPUs are visible, else 1 (a group needs a GPU per rank)
        env["COMFY_XDIT_WORKERS"] = str(max(1, min(2, config.visible_gpus())))
    rows = []
    with headless.Server(comfyui, base_dir, env=env, cpu=not gpu, log_path=os.path.join(base_dir, "soak.log")) as server:
        for i, p in enumerate(plan(n)):
            t = time.monotonic()
            server.run(faults.workflow(**p), timeout=900)
            rows.append(dict(p, seconds=time.monotonic() - t, **sample(server.proc.pid)))
            r = rows[-1]
            print(f"{i + 1:3d} {p['size']:4d}px lora={'on ' if p['lora'] else 'off'} cfg={p['cfg']:<3} "
                  f"{r['seconds']:6.1f}s comfy {r['comfy_rss']:7.1f} MiB ranks {[round(x, 1) for x in r['rank_rss']]} "
                  f"fds {r['fds']} shm {r['shm']} gpu {r['gpu']}", flush=True)
        log = server.log()
    ranks_changed = len({tuple(r["ranks"]) for r in rows}) > 1
    checks = {"ComfyUI RSS": growth(rows, lambda r: r["comfy_rss"]), "open fds": growth(rows, lambda r: r["fds"]),
              "shm segments": growth(rows, lambda r: r["shm"] or 1)}
    for k in range(len(rows[0]["rank_rss"])):
        checks[f"rank {k} RSS"] = growth(rows, lambda r: r["rank_rss"][k])
    for k in range(len(rows[0]["gpu"])):
        checks[f"GPU memory {k}"] = growth(rows, lambda r: r["gpu"][k])
    runs = [(int(a), int(b)) for a, b in re.findall(r"(\d+) of (\d+) model calls ran on the", log)]
    routed = sum(a == b > 0 for a, b in runs)  # prompts whose every model call ran on the ranks
    ok = (all(abs(v) <= LIMIT or v < 0 for v in checks.values()) and not ranks_changed and "failed (" not in log
          and routed == n)
    lines = [f"Soak: {n} prompts on one server ({'GPU' if gpu else 'CPU'} ranks; sizes {SIZES}, LoRA on/off, "
             f"cfg 1/3.5, 4 steps each).", "",
             "| measure | at prompt 10 | at prompt %d | growth |" % n, "|---|---|---|---|"]
    firsts = {"ComfyUI RSS": (rows[9]["comfy_rss"], rows[-1]["comfy_rss"], "MiB"),
              "open fds": (rows[9]["fds"], rows[-1]["fds"], ""), "shm segments": (rows[9]["shm"], rows[-1]["shm"], "")}
    for k in range(len(rows[0]["rank_rss"])):
        firsts[f"rank {k} RSS"] = (rows[9]["rank_rss"][k], rows[-1]["rank_rss"][k], "MiB")
    for k in range(len(rows[0]["gpu"])):
        firsts[f"GPU memory {k}"] = (rows[9]["gpu"][k], rows[-1]["gpu"][k], "MiB")
    for name, (a, b, unit) in firsts.items():
        lines.append(f"| {name} | {a:.1f} {unit} | {b:.1f} {unit} | {checks[name] * 100:+.2f} % |")
    lines += ["", f"Prompts routed whole: {routed} of {n} ({env['COMFY_XDIT_WORKERS']} ranks). "
              f"Same rank processes throughout: {'no' if ranks_changed else 'yes'}; fallbacks: "
              f"{log.count('failed (')}; every prompt's seconds: "
              + ", ".join(f"{r['seconds']:.1f}" for r in rows)]
    return "\n".join(lines), ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--gpu", action="store_true", help="GPU ranks (ComfyUI without --cpu)")
    p.add_argument("--base", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    text, ok = soak(a.base or tempfile.mkdtemp(prefix="xdit_soak_"), max(a.prompts, 10), a.gpu)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
