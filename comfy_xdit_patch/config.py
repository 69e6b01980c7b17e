"""Every environment variable the plugin reads, in one table, parsed once into a frozen Config.

Each variable has an audience: "user" (README.md), "tuning" and "diagnostics" (docs/configuration.md).
Those tables are generated from ENV_VARS (`comfy-xdit env-table --write FILE`), and a test keeps them in step.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Mapping


@dataclasses.dataclass(frozen=True)
class Mesh:
    """world = cfg x ulysses x ring. Ranks of one sequence-parallel group are consecutive."""

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world(self) -> int:
        return self.cfg * self.sp

    def __str__(self) -> str:
        return f"cfg={self.cfg},ulysses={self.ulysses},ring={self.ring}"


class ConfigError(ValueError):
    """A variable holds a value the plugin does not accept; the message names both."""

    def __init__(self, var: str, value: str, accepted: str):
        super().__init__(f"{var}={value!r} is not valid; accepted: {accepted}. comfy_xdit_patch stays off.")
        self.var = var


@dataclasses.dataclass(frozen=True)
class Config:
    enabled: bool
    workers: int
    devices: tuple[int, ...] | None
    parallel: Mesh | None  # forced degrees; None = auto
    ray_address: str | None
    fallback: str
    timeout: float
    load_timeout: float
    start_timeout: float
    attention: str
    usp_kernel: str
    sdpa: str
    a2a_chunks: int | None  # None: tuned per shape
    exchange: str
    cuda_graphs: bool
    compile: bool
    model_cache: int
    cache_dir: str
    prestart: bool
    remember_last: bool  # the last run's model and first call are kept for the next process
    while_starting: str  # "local" | "wait": a FLUX run that comes while the early group still starts
    join_retry: float  # seconds before a run tries again to join a cluster that could not be joined
    shard_weights: str  # "auto" | "on" | "off": ranks keep 1/N of each block's weights (rank/weights.py)
    vae_min_pixels: int | None  # a VAE decode of at least this many pixels a latent is shared out by rows; None: never
    gpu_cap: float | None  # GiB of its GPU each rank may use (None: all of it)
    gpus: int  # GPUs the ranks may use (0: ranks run on CPU)

    @property
    def use_gpu(self) -> bool:
        return self.gpus > 0


@dataclasses.dataclass(frozen=True)
class EnvVar:
    name: str
    default: str  # as written in the generated tables
    doc: str
    parse: Callable[[str, str], object]
    audience: str = "user"  # user (README) | tuning | diagnostics (docs/configuration.md)


AUDIENCES = ("user", "tuning", "diagnostics")


def _bool(var: str, raw: str) -> bool:
    if raw in ("1", "true", "on", "yes"):
        return True
    if raw in ("0", "false", "off", "no"):
        return False
    raise ConfigError(var, raw, "1 (on) or 0 (off)")


def _positive_int(var: str, raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(var, raw, "a whole number >= 1")
    return int(raw)


def _positive(unit: str):
    def parse(var: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ConfigError(var, raw, f"a number of {unit} > 0")
        return value
    return parse


_seconds, _gib = _positive("seconds"), _positive("GiB")


def _devices(var: str, raw: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\d+(,\d+)*", raw):
        raise ConfigError(var, raw, "comma-separated GPU ids such as 0,1")
    ids = tuple(int(x) for x in raw.split(","))
    if len(set(ids)) != len(ids):
        raise ConfigError(var, raw, "distinct GPU ids")
    return ids


def _parallel(var: str, raw: str) -> Mesh | None:
    if raw == "auto":
        return None
    accepted = "auto, or degrees such as ulysses=2,ring=1,cfg=1 (keys cfg, ulysses, ring; values >= 1)"
    degrees = {}
    for part in raw.split(","):
        key, _, value = part.partition("=")
        if key not in ("cfg", "ulysses", "ring") or not value.isdigit() or int(value) < 1 or key in degrees:
            raise ConfigError(var, raw, accepted)
        degrees[key] = int(value)
    return Mesh(**degrees)


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(var: str, raw: str) -> str:
        if raw not in choices:
            raise ConfigError(var, raw, " or ".join(choices))
        return raw
    return parse


def _chunks(var: str, raw: str) -> int | None:
    if raw == "auto":
        return None
    if raw not in ("1", "2", "3", "4"):
        raise ConfigError(var, raw, "auto, 1, 2, 3 or 4")
    return int(raw)


def _pixels(var: str, raw: str) -> int | None:
    if raw == "off":
        return None
    if not raw.isdigit():
        raise ConfigError(var, raw, "off, or a whole number of pixels >= 0")
    return int(raw)


def _text(var: str, raw: str) -> str:
    return raw


ENV_VARS: tuple[EnvVar, ...] = (
    # --- user settings (README.md) ---
    EnvVar("COMFY_XDIT", "on with >= 2 GPUs", "`1` routes FLUX through the worker group, `0` leaves ComfyUI untouched.", _bool),
    EnvVar("COMFY_XDIT_WORKERS", "all visible GPUs (2 on a CPU-only machine)",
           "Number of ranks. With no GPU the ranks run on CPU over gloo.", _positive_int),
    EnvVar("COMFY_XDIT_DEVICES", "all", "GPU ids the ranks use, e.g. `0,1`.", _devices),
    EnvVar("COMFY_XDIT_PARALLEL", "auto",
           "`auto`, or forced degrees such as `ulysses=2,ring=1,cfg=1` (product = ranks).", _parallel),
    EnvVar("COMFY_XDIT_RAY_ADDRESS", "private local cluster",
           "Join this Ray cluster (`host:port` of its head) instead of starting a private one on 127.0.0.1.", _text),
    EnvVar("COMFY_XDIT_FALLBACK", "local",
           "`local`: a failed routed call runs in ComfyUI's process; `error`: it raises.", _choice("local", "error")),
    EnvVar("COMFY_XDIT_TIMEOUT", "120", "Seconds one routed model call may take before it falls back.", _seconds),
    EnvVar("COMFY_XDIT_LOAD_TIMEOUT", "900", "Seconds the workers may take to load or re-patch a model.", _seconds),
    EnvVar("COMFY_XDIT_START_TIMEOUT", "180", "Seconds the worker group may take to start.", _seconds),
    EnvVar("COMFY_XDIT_PRESTART", "1",
           "`1`: the worker group starts with ComfyUI, in the background, with the last run's model; `0`: on "
           "the first FLUX run.", _bool),
    EnvVar("COMFY_XDIT_WHILE_STARTING", "local",
           "A FLUX run that comes while the worker group started with ComfyUI is still starting (or loading "
           "the last model ahead): `local` runs it in ComfyUI's process, as without the plugin, when ComfyUI's "
           "GPU can hold a second copy of the model (2.5x its size); `wait` waits for the group.",
           _choice("local", "wait"), "tuning"),
    EnvVar("COMFY_XDIT_JOIN_RETRY", "30",
           "Seconds before a FLUX run tries again to join the Ray cluster at `COMFY_XDIT_RAY_ADDRESS` after it "
           "could not be joined (doubles with each failed try, up to 10 min); runs meanwhile stay in ComfyUI's "
           "process.", _seconds, "tuning"),
    EnvVar("COMFY_XDIT_CACHE_DIR", "~/.cache/comfy_xdit_patch",
           "Compiled code and the last run's record, kept between ComfyUI processes.", _text),
    EnvVar("COMFY_XDIT_REMEMBER", "1",
           "`1`: the last run's model and first call (its prompt's embeddings) are kept, for you alone, and run "
           "ahead at the next start; `0`: none kept.",
           _bool),
    EnvVar("COMFY_XDIT_MODEL_CACHE", "1", "Base models each rank keeps loaded (the least recently used goes).",
           _positive_int),
    EnvVar("COMFY_XDIT_SHARD_WEIGHTS", "auto",
           "`on`: each rank keeps 1/N of each block's weights, gathering a block while the one before computes; "
           "`off`: a full copy per rank; `auto`: on where a GPU can't hold a copy plus a run (off on CPU).",
           _choice("auto", "on", "off")),
    EnvVar("COMFY_XDIT_COMPILE", "1 (GPU)",
           "`1`: each rank compiles the FLUX blocks at each new resolution (~6 s on an H200); `0`: as in "
           "ComfyUI.", _bool),
    # --- tuning (docs/configuration.md): the defaults are the measured best; change them to compare ---
    EnvVar("COMFY_XDIT_ATTENTION", "auto",
           "Sequence-parallel attention: `auto`, `torch` (Ulysses all-to-all + ComfyUI's attention), "
           "`gather` (each rank gathers all keys/values for its own queries + ComfyUI's attention), "
           "`yunchang` (USP: Ulysses x Ring, CUDA).", _choice("auto", "torch", "gather", "yunchang"), "tuning"),
    EnvVar("COMFY_XDIT_USP_KERNEL", "auto",
           "yunchang kernel: `auto` (torch_cudnn on CUDA), `torch_flash`, `torch_efficient`, `torch_cudnn`, "
           "`fa` (flash-attn), `fa3`. With ring > 1, kernels other than cuDNN run without CUDA graphs.",
           _choice("auto", "torch_flash", "torch_efficient", "torch_cudnn", "fa", "fa3"), "tuning"),
    EnvVar("COMFY_XDIT_SDPA", "comfyui",
           "Torch SDPA kernel the ranks prefer for their attention: `comfyui` (ComfyUI's choice), `cudnn`, `flash`, "
           "`efficient`.", _choice("comfyui", "cudnn", "flash", "efficient"), "tuning"),
    EnvVar("COMFY_XDIT_A2A_CHUNKS", "auto (GPU), 1 (CPU)",
           "Pieces the Ulysses all-to-all is cut into to overlap it with attention; `auto` times 1, 2 and 3 equal "
           "pieces and a tapered schedule on the first calls of each shape and keeps the fastest.", _chunks, "tuning"),
    EnvVar("COMFY_XDIT_EXCHANGE", "auto",
           "How the Ulysses all-to-alls move: `auto` (peer copies where the ranks of a group share a host "
           "and can map each other's GPU memory, else collective); `peer-copy` (copy-engine writes straight "
           "into the peers' GPU memory; refused where impossible); `collective` (NCCL / gloo all-to-all).",
           _choice("collective", "peer-copy", "auto"), "tuning"),
    EnvVar("COMFY_XDIT_GPU_CAP", "the whole GPU",
           "GiB of its GPU each rank may use: the rank is held to it (torch's per-process memory fraction) and its "
           "ComfyUI plans loading and offloading as on a card of that size (its reserve, `--reserve-vram`, grown "
           "by the rest); `auto` weight sharding then decides from that size.", _gib, "tuning"),
    EnvVar("COMFY_XDIT_CUDA_GRAPHS", "1 (GPU)",
           "`1`: each rank captures its sharded model call as a CUDA graph per input shape and replays it; "
           "`0`: eager.", _bool, "tuning"),
    EnvVar("COMFY_XDIT_VAE_MIN_PIXELS", "4194304 (2048²)",
           "A VAE decode (FLUX's, Wan 2.1 / 2.2's) whose output has at least this many pixels per latent (frames x "
           "height x width) runs on the worker group, each rank decoding a band of rows, when the group is up with two "
           "ranks or more (one would decode what ComfyUI does, a round trip later); `0`: every such decode, `off`: "
           "none. At the default: FLUX images from 2048², 480p Wan clips from 13 frames.",
           _pixels, "tuning"),
    # --- diagnostics (docs/configuration.md): wrong images on purpose, never for real work ---
    EnvVar("COMFY_XDIT_DIAG_LOOPBACK", "0",
           "`1`: the Ulysses exchange hands each rank its own pieces and nothing crosses between ranks (overrides "
           "`COMFY_XDIT_EXCHANGE`): same shapes, copies and kernels, so a run times the ranks' compute without "
           "any exchange. **Images are wrong.**", _bool, "diagnostics"),
)


def gpus_from_driver() -> int:
    """visible_gpus() without torch (ComfyUI's prestartup, before it imports torch): the driver's GPUs
    (nvidia-smi), narrowed by CUDA_VISIBLE_DEVICES; none under ComfyUI's --cpu or without nvidia-smi."""
    import shutil
    import subprocess
    import sys

    cli = sys.modules.get("comfy.cli_args")
    if (cli is not None and getattr(cli.args, "cpu", False)) or shutil.which("nvidia-smi") is None:
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    ids = [line.split(":")[0].split()[-1] for line in listed.splitlines() if line.startswith("GPU ")]
    chosen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is None:
        return len(ids)
    count = 0
    for entry in (e.strip() for e in chosen.split(",")):  # CUDA stops at the first invalid entry
        if not entry.isdigit() or int(entry) >= len(ids):
            break
        count += 1
    return count


def visible_gpus() -> int:
    """GPUs the ranks may use: none where torch sees none or ComfyUI itself runs on the CPU (--cpu)."""
    import sys

    import torch

    if not torch.cuda.is_available():
        return 0
    mm = sys.modules.get("comfy.model_management")
    if mm is not None and mm.get_torch_device().type != "cuda":
        return 0
    cli = sys.modules.get("comfy.cli_args")  # before ComfyUI has imported model_management (prestartup)
    if mm is None and cli is not None and getattr(cli.args, "cpu", False):
        return 0
    return torch.cuda.device_count()


def load(environ: Mapping[str, str] | None = None, gpus: int | None = None) -> Config:
    """Parse the environment. Raises ConfigError naming the first bad variable."""
    env = os.environ if environ is None else environ
    raw = {v.name: env[v.name].strip() for v in ENV_VARS if env.get(v.name, "").strip() != ""}
    val = {v.name: v.parse(v.name, raw[v.name]) for v in ENV_VARS if v.name in raw}
    gpus = visible_gpus() if gpus is None else gpus

    devices = val.get("COMFY_XDIT_DEVICES")
    if devices is not None and gpus and max(devices) >= gpus:
        raise ConfigError("COMFY_XDIT_DEVICES", raw["COMFY_XDIT_DEVICES"], f"ids below {gpus} (GPUs visible)")
    default_workers = len(devices) if devices else (gpus if gpus else 2)
    workers = val.get("COMFY_XDIT_WORKERS", default_workers)
    if gpus and workers > (len(devices) if devices else gpus):
        raise ConfigError("COMFY_XDIT_WORKERS", raw.get("COMFY_XDIT_WORKERS", str(workers)),
                          f"at most {len(devices) if devices else gpus} (GPUs available)")
    if val.get("COMFY_XDIT_EXCHANGE") == "peer-copy" and not gpus:
        raise ConfigError("COMFY_XDIT_EXCHANGE", raw["COMFY_XDIT_EXCHANGE"], "`collective` or `auto` (peer copies need GPUs)")
    parallel = val.get("COMFY_XDIT_PARALLEL")
    if parallel is not None and parallel.world != workers:
        raise ConfigError("COMFY_XDIT_PARALLEL", raw["COMFY_XDIT_PARALLEL"],
                          f"degrees whose product is the number of ranks ({workers})")
    return Config(
        enabled=val.get("COMFY_XDIT", gpus >= 2),
        workers=workers,
        devices=devices,
        parallel=parallel,
        ray_address=val.get("COMFY_XDIT_RAY_ADDRESS"),
        fallback=val.get("COMFY_XDIT_FALLBACK", "local"),
        timeout=val.get("COMFY_XDIT_TIMEOUT", 120.0),
        load_timeout=val.get("COMFY_XDIT_LOAD_TIMEOUT", 900.0),
        start_timeout=val.get("COMFY_XDIT_START_TIMEOUT", 180.0),
        attention=val.get("COMFY_XDIT_ATTENTION", "auto"),
        usp_kernel=val.get("COMFY_XDIT_USP_KERNEL", "auto"),
        sdpa=val.get("COMFY_XDIT_SDPA", "comfyui"),
        a2a_chunks=val.get("COMFY_XDIT_A2A_CHUNKS", None if gpus else 1),
        # NOTE: "loopback" is an exchange only the diagnostics variable reaches (images wrong by design).
        exchange="loopback" if val.get("COMFY_XDIT_DIAG_LOOPBACK") else val.get("COMFY_XDIT_EXCHANGE", "auto"),
        cuda_graphs=val.get("COMFY_XDIT_CUDA_GRAPHS", True),
        compile=val.get("COMFY_XDIT_COMPILE", bool(gpus)),
        model_cache=val.get("COMFY_XDIT_MODEL_CACHE", 1),
        cache_dir=val.get("COMFY_XDIT_CACHE_DIR", "~/.cache/comfy_xdit_patch"),
        prestart=val.get("COMFY_XDIT_PRESTART", True),
        remember_last=val.get("COMFY_XDIT_REMEMBER", True),
        while_starting=val.get("COMFY_XDIT_WHILE_STARTING", "local"),
        join_retry=val.get("COMFY_XDIT_JOIN_RETRY", 30.0),
        shard_weights=val.get("COMFY_XDIT_SHARD_WEIGHTS", "auto"),
        vae_min_pixels=val.get("COMFY_XDIT_VAE_MIN_PIXELS", 2048 * 2048),
        gpu_cap=val.get("COMFY_XDIT_GPU_CAP"),
        gpus=gpus,
    )


def markdown_table(audience: str = "user") -> str:
    """The variables of one audience as a markdown table (README: user; docs/configuration.md: the others)."""
    if audience not in AUDIENCES:
        raise ValueError(f"audience {audience!r}: one of {', '.join(AUDIENCES)}")
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{v.name}` | {v.default} | {v.doc} |" for v in ENV_VARS if v.audience == audience]
    return "\n".join(rows)
