"""Time to the first image, as a user waits for it: from starting ComfyUI to the saved image.

    comfy-xdit first-image [--size 1024] [--steps 20] [--new-size 1280] [--workdir DIR] [--out DIR]

Each case is a fresh ComfyUI server (main.py) on the same machine, with the same FLUX workflow:
- ComfyUI alone: cold (the first process) and again (a second process: the OS has the weights cached);
- the plugin, cold: a new, empty compile cache (COMFY_XDIT_CACHE_DIR), as after an install or an upgrade;
- the plugin, warm restart: a second process with the cache the cold one filled;
- a new resolution in that running server: its first image at --new-size, less a warm image at that size.
Prints a table and writes first_image.json. On a CPU-only machine it runs a tiny FLUX on CPU ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from .. import config, locate
from . import demo, headless


def _args(argv):
    ap = argparse.ArgumentParser(prog="comfy-xdit first-image", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, help="image width = height (default 1024 on GPU, 128 on CPU)")
    ap.add_argument("--new-size", type=int, help="the resolution asked for next (default size + 256, CPU: + 64)")
    ap.add_argument("--steps", type=int, help="sampling steps (default 20 on GPU, 4 on CPU)")
    ap.add_argument("--unet", help="a FLUX diffusion-model file (default: synthetic FLUX.1-dev weights on GPU)")
    ap.add_argument("--workers", type=int, help="ranks (default: all GPUs; 2 on CPU)")
    ap.add_argument("--workdir", default="~/.cache/comfy_xdit_patch/demo", help="ComfyUI base directory to use")
    ap.add_argument("--while-starting", default="local", choices=("local", "wait"),
                    help="COMFY_XDIT_WHILE_STARTING for the plugin's servers (default: the plugin's default)")
    ap.add_argument("--out", default="bench_out")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = _args(argv)
    comfy = locate.import_comfy()
    gpus = config.visible_gpus()
    base = os.path.abspath(os.path.expanduser(a.workdir))
    headless.prepare_base(base, locate.CHECKOUT)
    models, what = demo._models(base, argparse.Namespace(checkpoint=None, unet=a.unet), gpus)
    size = a.size or (1024 if gpus else 128)
    new_size = a.new_size or size + (256 if gpus else 64)
    steps = a.steps or (20 if gpus else 4)
    cache = tempfile.mkdtemp(prefix="xdit-compile-cache-")
    on = {"COMFY_XDIT": "1", "COMFY_XDIT_CACHE_DIR": cache, "COMFY_XDIT_WHILE_STARTING": a.while_starting}
    if a.workers or not gpus:
        on["COMFY_XDIT_WORKERS"] = str(a.workers or 2)
    print(f"model: {what}; {size}² then {new_size}², {steps} steps; compile cache {cache}", flush=True)
    seed = [0]

    def image(server, px):
        seed[0] += 1  # a new seed each time, or ComfyUI would serve its cache
        return server.run(headless.flux_workflow(px, px, steps, seed=seed[0], **models))["seconds"]

    def first(label, env, more=None):
        t0 = time.perf_counter()
        with headless.Server(comfy, base, env=env, cpu=not gpus,
                             log_path=os.path.join(base, f"first-image-{label.replace(' ', '-')}.log")) as server:
            image(server, size)
            row = {"case": label, "first_image_s": time.perf_counter() - t0, "server_up_s": server.up_seconds}
            if env is on and server._get("/xdit/status")["runs_while_starting"]:  # ran as ComfyUI alone
                while "done" not in (server._get("/xdit/status")["early_start"] or {"done": None}):
                    assert time.perf_counter() - t0 < 600, "the early start did not end"
                    time.sleep(0.2)
                row["group_ready_s"] = time.perf_counter() - t0  # from here on, runs are routed
                row["first_routed_image_s"] = image(server, size)
            if env is on:  # what the first routed run waited for: the group, then the ranks' weights
                doc = server._get("/xdit/status?ranks=1")
                row.update(group_start_s=doc["group_start_seconds"],
                           rank_load_s=max((r.get("load_seconds") or 0.0) for r in doc["ranks"]),
                           first_run_prepare_s=doc["last_run"]["prepare_seconds"],
                           first_run_s=doc["last_run"]["seconds"], group_phases=doc["group_start_phases"],
                           rank_start=doc["ranks"][0].get("start_seconds"),
                           early_start=doc["early_start"],
                           loaded_ahead="loaded the last run's model ahead" in server.log())
            row["warm_image_s"] = image(server, size)
            if more:
                row.update(more(server))
        if "group_ready_s" in row:
            print(f"  {label:<28} (the first image ran in ComfyUI's process; the group was ready "
                  f"{row['group_ready_s']:.1f} s after start, its first image took {row['first_routed_image_s']:.1f} s)")
        print(f"  {label:<28} first image {row['first_image_s']:7.1f} s after start, warm image "
              f"{row['warm_image_s']:6.2f} s" + (f" (group start {row['group_start_s']:.1f} s, ranks' weights "
              f"{row['rank_load_s']:.1f} s; the first run waited {row['first_run_prepare_s']:.1f} s of its "
              f"{row['first_run_s']:.1f} s for them)" if "group_start_s" in row else ""), flush=True)
        return row

    def new_resolution(server):
        first_at = image(server, new_size)
        warm_at = image(server, new_size)
        print(f"  new resolution {new_size}²: first {first_at:.1f} s, warm {warm_at:.2f} s, "
              f"extra {first_at - warm_at:.1f} s", flush=True)
        return {"new_size": new_size, "new_size_first_s": first_at, "new_size_warm_s": warm_at}

    off = {"COMFY_XDIT": "0"}
    rows = [first("ComfyUI alone, cold", off), first("ComfyUI alone, again", off),
            first("plugin, cold cache", on), first("plugin, warm restart", on, new_resolution)]
    results = {"gpus": gpus, "size": size, "steps": steps, "model": what, "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "first_image.json"), "w") as f:
        json.dump(results, f, indent=1)
    alone, warm = rows[1]["first_image_s"], rows[3]["first_image_s"]
    print(f"warm restart vs ComfyUI alone's own first image: {warm - alone:+.1f} s; "
          f"new resolution: {rows[3]['new_size_first_s'] - rows[3]['new_size_warm_s']:+.1f} s over a warm image")
    return 0
