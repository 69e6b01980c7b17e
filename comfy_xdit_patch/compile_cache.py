"""COMFY_XDIT_CACHE_DIR: the ranks' compiled code, kept between ComfyUI processes.

torch.compile keeps what it builds (FX graphs, Triton kernels, autotuning results) in inductor's and
Triton's on-disk caches, by default under /tmp: shared by every torch on the machine, and gone after a
reboot. Each rank points both at `<cache dir>/compile/<key>`, where the key names everything those
artefacts depend on: torch (with its CUDA and Triton), ComfyUI, this plugin's runtime code and the
GPU. Another version of any of them reads another folder, so a stale artefact is never loaded. The
folder's stamp says what it was made for; a folder whose stamp can't be read is emptied (one log line)
and the blocks compile afresh. A cache that can't be written at all leaves torch's defaults in place.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

log = logging.getLogger(__name__)

_RUNTIME = os.path.dirname(os.path.abspath(__file__))


def _plugin_code() -> str:
    """A digest of the runtime's own sources (tools excluded): any change to them is a new key."""
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(_RUNTIME)):
        dirs[:] = sorted(d for d in dirs if d not in ("tools", "__pycache__"))
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def _comfyui_version() -> str:
    try:
        from comfyui_version import __version__
    except ImportError:
        return "unknown"
    return __version__


def components(gpu: str | None) -> dict:
    """What compiled artefacts depend on; the cache key is a digest of it."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "comfyui": _comfyui_version(), "plugin": _plugin_code(), "gpu": gpu}


def folder(root: str, parts: dict) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(root), "compile", digest)


def _check(path: str, parts: dict) -> None:
    """Raise if the folder can't be used as it is; make it (with its stamp) if it doesn't exist."""
    stamp = os.path.join(path, "stamp.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            held = json.load(f)
        if held != parts:
            raise ValueError(f"its stamp names other versions: {held}")
        return
    os.makedirs(path, exist_ok=True)
    with open(stamp + ".part", "w") as f:
        json.dump(parts, f)
    os.replace(stamp + ".part", stamp)


def use(root: str, gpu: str | None) -> str | None:
    """Point inductor and Triton at this machine's keyed folder under `root` (before anything compiles).
    Returns the folder, or None where none can be used (torch's defaults then apply)."""
    parts = components(gpu)
    path = folder(root, parts)
    try:
        _check(path, parts)
    except (OSError, ValueError) as e:
        log.warning("compile cache %s can't be read (%s: %s); emptied, the blocks compile afresh", path,
                    type(e).__name__, e)
        shutil.rmtree(path, ignore_errors=True)
        try:
            _check(path, parts)
        except OSError as e2:
            log.warning("compile cache %s can't be written (%s); using torch's default cache", path, e2)
            return None
    # NOTE: read by inductor and Triton whenever they look for a cache entry, so it must be set before
    # the first compile of this process and never changed afterwards.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(path, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(path, "triton")
    return path
