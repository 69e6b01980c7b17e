"""`comfy-xdit doctor`: what the plugin finds on this machine, each problem with what to do about it.

Exit status 1 when something the plugin needs is missing or broken; notes (no GPU, one GPU, no
NVLink) are said but are not problems. Output goes to stdout: this is a command for a person.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
import time

FLUX_HEADS = 24  # FLUX.1 [dev]/[schnell]: 24 attention heads of 128
FLUX_1024_TOKENS = (1024 // 16) ** 2 + 512  # image tokens (2x2 patches of the 8x latent) + T5 tokens
SHM_LOW = 2 * 2**30  # Ray's object store and the ranks' shared request memory live in /dev/shm



@dataclasses.dataclass
class Report:
    problems: int = 0

    def ok(self, what: str, text: str) -> None:
        print(f"[ok]   {what}: {text}")

    def note(self, what: str, text: str) -> None:
        print(f"[note] {what}: {text}")

    def problem(self, what: str, text: str, fix: str) -> None:
        self.problems += 1
        print(f"[FAIL] {what}: {text}\n       what to do: {fix}")

    def detail(self, text: str) -> None:
        for line in text.rstrip().splitlines():
            print(f"       {line}")


def check_comfyui(r: Report, gpu: bool) -> bool:
    from .. import locate

    root = locate.find_comfyui()
    if root is None:
        r.problem("ComfyUI", "not found", locate.HOW_TO_GET)
        return False
    locate.import_comfy(cpu=not gpu)
    try:
        import comfyui_version

        version = comfyui_version.__version__
    except ImportError:
        version = "unknown version"
    r.ok("ComfyUI", f"{version} at {root}")
    from ..driver import seams  # the plugin's own check: it steps aside where one is missing

    missing = seams.missing()
    if missing:
        r.problem("ComfyUI seams", "missing: " + "; ".join(missing) + " (the plugin stays off)",
                  f"update ComfyUI to {seams.OLDEST} or newer (git pull), or the plugin if ComfyUI is newer")
    else:
        r.ok("ComfyUI seams", ", ".join(name for name, _ in seams.SEAMS))
    return True


def check_torch(r: Report) -> int:
    import torch

    cuda = torch.version.cuda or "none (CPU build)"
    nccl = ""
    if torch.cuda.is_available():
        try:
            nccl = ", NCCL " + ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # a build without NCCL
            nccl = f", NCCL unavailable ({e})"
    r.ok("torch", f"{torch.__version__}, CUDA {cuda}{nccl}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        r.note("GPUs", "none visible. What still works: COMFY_XDIT=1 routes FLUX to CPU ranks over gloo "
               "(2 by default; correct images, slow: for trying the plugin and its tests). For speed: >= 2 GPUs")
        return 0
    for i in range(gpus):
        free, total = torch.cuda.mem_get_info(i)
        props = torch.cuda.get_device_properties(i)
        r.ok(f"GPU {i}", f"{props.name}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free), "
                         f"compute {props.major}.{props.minor}")
    if gpus == 1:
        r.note("GPUs", "one GPU: the plugin is off by default (nothing to share the work with)")
    return gpus


def check_peers(r: Report, gpus: int) -> None:
    import torch

    if gpus < 2:
        return
    rows = ["     " + " ".join(f"{j:>4}" for j in range(gpus))]
    blocked = []
    for i in range(gpus):
        cells = []
        for j in range(gpus):
            if i == j:
                cells.append("   -")
                continue
            can = torch.cuda.can_device_access_peer(i, j)
            cells.append(" yes" if can else "  no")
            if not can:
                blocked.append((i, j))
        rows.append(f"{i:>4} " + " ".join(cells))
    if blocked:
        r.note("peer access", f"{len(blocked)} GPU pair(s) can't map each other's memory: the all-to-alls go "
               "through NCCL there (COMFY_XDIT_EXCHANGE=auto does this by itself)")
    else:
        r.ok("peer access", "every GPU pair can map each other's memory (peer copies possible)")
    r.detail("\n".join(rows))
    smi = shutil.which("nvidia-smi")
    if smi is None:
        r.note("NVLink", "nvidia-smi not found; topology unknown")
        return
    try:
        topo = subprocess.run([smi, "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        r.note("NVLink", f"nvidia-smi topo -m failed: {e}")
        return
    links = "NVLink" if "NV" in "".join(line.split("\t", 1)[-1] for line in topo.splitlines()[1:gpus + 1]) \
        else "no NVLink between these GPUs (PCIe: the exchanges are slower)"
    r.ok("topology (nvidia-smi topo -m)", links)
    r.detail(topo)


def check_shm(r: Report) -> None:
    try:
        usage = shutil.disk_usage("/dev/shm")
    except OSError as e:
        r.problem("/dev/shm", f"not usable ({e})", "mount a tmpfs at /dev/shm (docker: --shm-size=8g or --ipc=host)")
        return
    text = f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB"
    if usage.free < SHM_LOW:
        r.problem("/dev/shm", text, "Ray and the ranks' request memory need a few GiB there: docker run "
                  "--shm-size=8g (or --ipc=host), or remount /dev/shm larger")
    else:
        r.ok("/dev/shm", text)


def check_packages(r: Report) -> None:
    for name, why in (("ray", "places and supervises the ranks"), ("wrapt", "attaches the plugin to ComfyUI")):
        try:
            module = importlib.import_module(name)
            r.ok(name, getattr(module, "__version__", "installed"))
        except ImportError as e:
            r.problem(name, f"missing ({e}); it {why}", "python install.py (in the plugin's folder)")
    try:
        import yunchang  # noqa: F401

        r.ok("yunchang", "installed (Ring attention on CUDA)")
    except Exception as e:  # an optional extra; ImportError or a broken build
        r.note("yunchang", f"not usable ({type(e).__name__}); Ulysses and the K/V-gather attention still work, "
               "Ring (ranks beyond the head count) doesn't")


def check_config(r: Report, gpus: int):
    from .. import config as cfg

    try:
        config = cfg.load(gpus=gpus)
    except cfg.ConfigError as e:
        r.problem("settings", str(e), f"fix or unset {e.var}")
        return None
    state = "on" if config.enabled else "off (COMFY_XDIT=1 turns it on)"
    r.ok("settings", f"{state}, {config.workers} {'GPU' if gpus else 'CPU'} rank(s), attention {config.attention}, "
                     f"layout {config.parallel or 'auto'}")
    return config


def check_ray(r: Report, config) -> None:
    """A private cluster as the plugin starts one (loopback), one task on it, timed; then shut down. A cluster
    to join (COMFY_XDIT_RAY_ADDRESS) is probed first: reachable, a Ray GCS, this process's token, its Ray version."""
    from ..group import cluster, join

    if config.ray_address:
        cause = join.probe(config.ray_address, min(config.start_timeout, 30.0))
        if cause is not None:
            r.problem(f"Ray cluster {config.ray_address}", cause,
                      "fix COMFY_XDIT_RAY_ADDRESS, start the cluster, or set its token and Ray version as said")
            return
        r.ok(f"Ray cluster {config.ray_address}", "reachable, a Ray GCS, takes this process's token, same Ray")
    try:
        t0 = time.perf_counter()
        cluster.init_ray(config)
        import ray

        started = time.perf_counter() - t0
        ray.get(ray.remote(lambda: os.getpid()).remote(), timeout=120)
        r.ok("Ray cluster", f"{'joined ' + config.ray_address if config.ray_address else 'private cluster on 127.0.0.1'}"
                            f" started in {started:.1f}s, first task after {time.perf_counter() - t0:.1f}s; "
                            f"resources {ray.cluster_resources()}")
        ray.shutdown()
    except Exception as e:
        r.problem("Ray cluster", f"did not start ({type(e).__name__}: {e})",
                  "check /dev/shm and free memory; a stale cluster: `ray stop`; set RAY_TMPDIR to a short path "
                  "you can write (Unix socket length); joining one: check COMFY_XDIT_RAY_ADDRESS")


def check_layouts(r: Report, config) -> None:
    from ..errors import LayoutError
    from ..rank import attention
    from ..wire import mesh as layout

    backend = attention.resolve(config.attention, "cuda" if config.use_gpu else "cpu")
    for cfg_scale, batch in ((1.0, 1), (3.5, 2)):  # cfg > 1: cond and uncond in one batch
        try:
            mesh = layout.choose_mesh(config.workers, batch, FLUX_HEADS, config.parallel, "yunchang" in backend,
                                      backend == "gather")
            r.ok(f"layout FLUX 1024x1024 cfg {cfg_scale}",
                 f"{mesh} on {config.workers} ranks ({FLUX_1024_TOKENS // mesh.sp} tokens a rank, {backend})")
        except LayoutError as e:
            r.problem(f"layout FLUX 1024x1024 cfg {cfg_scale}", str(e),
                      "use a rank count whose layout divides FLUX's 24 heads (2, 3, 4, 6, 8), install yunchang "
                      "for Ring, or COMFY_XDIT_ATTENTION=gather")


def run(args=None) -> int:
    r = Report()
    print(f"comfy-xdit doctor (python {sys.version.split()[0]})")
    import torch

    gpu = torch.cuda.is_available()
    check_comfyui(r, gpu)
    gpus = check_torch(r)
    check_peers(r, gpus)
    check_shm(r)
    check_packages(r)
    config = check_config(r, gpus)
    if config is not None:
        check_layouts(r, config)
        if getattr(args, "no_ray", False):
            r.note("Ray cluster", "not started (--no-ray)")
        else:
            check_ray(r, config)
    print(f"{r.problems} problem(s)" if r.problems else "no problems found")
    return 1 if r.problems else 0
