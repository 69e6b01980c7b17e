"""COMFY_XDIT_CACHE_DIR: the ranks' compiled code, kept between ComfyUI processes.

torch.compile keeps what it builds (FX graphs, Triton kernels, autotuning results) in inductor's and
Triton's on-disk caches, by default under /tmp: shared by every torch on the machine, and gone after a
reboot. Each rank points both at `<cache dir>/compile/<key>`, where the key names everything those
artefacts depend on: torch (with its CUDA and Triton), ComfyUI, this plugin's runtime code and the
GPU. Another version of any of them reads another folder, so a stale artefact is never loaded. The
folder's stamp says what it was made for. Inductor fails, rather than recompiles, on an artefact it
can't read, so only what a rank sealed after a successful call is trusted at the next start: `seal`
records each file's size and digest, and `use` removes files written after the last seal and empties
the folder when a sealed file changed or the stamp can't be read (one log line); the blocks then
compile afresh. A cache that can't be written at all leaves torch's defaults in place.
The ranks of a group (and any other ComfyUI on the machine) share the folder: its records are read and
written under a lock (flock), each through a file of its writer's own, so they never race; and each
process holds a shared lock on it while it lives, so a starting process removes or empties nothing while
another one may be compiling into it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile

log = logging.getLogger(__name__)

_RUNTIME = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package


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


STAMP, SEALED, LOCK, USERS = "stamp.json", "sealed.json", ".lock", ".users"
_held: dict = {}  # folder -> this process's USERS file there, share-locked until it exits


def _files(path: str) -> dict:
    """relative path -> [size, sha256] of every artefact in the folder."""
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, path)
            if rel in (STAMP, SEALED, LOCK, USERS) or rel.endswith(".part"):
                continue
            with open(full, "rb") as f:
                out[rel] = [os.path.getsize(full), hashlib.sha256(f.read()).hexdigest()]
    return out


def _write(path: str, value) -> None:
    fd, part = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".", suffix=".part")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f)
    os.replace(part, path)


@contextlib.contextmanager
def _locked(path: str):
    """One process at a time reads or writes the folder's records."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, LOCK), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
        yield


def seal(path: str | None) -> None:
    """Trust what the folder holds now (called after a call that compiled has succeeded)."""
    if path is not None:
        with _locked(path):
            _write(os.path.join(path, SEALED), _files(path))


def _claim(path: str) -> bool:
    """Use the folder for the rest of this process (a shared lock); True if no other process uses it."""
    if path in _held:  # this process's own earlier claim
        _held.pop(path).close()
    f = open(os.path.join(path, USERS), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:
        alone = False
    fcntl.flock(f, fcntl.LOCK_SH)
    _held[path] = f
    return alone


def _empty(path: str) -> None:
    for name in os.listdir(path):
        if name not in (LOCK, USERS):
            full = os.path.join(path, name)
            shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.remove(full)


def _check(path: str, parts: dict, prune: bool = True) -> None:
    """Raise if the folder can't be used as it is; make it (with its stamp) if it doesn't exist. Files
    written after the last seal are removed (`prune`: no other process is using the folder; a process may
    have died writing them)."""
    stamp = os.path.join(path, STAMP)
    if os.path.exists(stamp):
        with open(stamp) as f:
            held = json.load(f)
        if held != parts:
            raise ValueError(f"its stamp names other versions: {held}")
        sealed_path = os.path.join(path, SEALED)
        sealed = {}
        if os.path.exists(sealed_path):
            with open(sealed_path) as f:
                sealed = json.load(f)
        for rel, facts in _files(path).items():
            if rel not in sealed:
                if prune:
                    os.remove(os.path.join(path, rel))
            elif facts != sealed[rel]:
                raise ValueError(f"{rel} changed since it was sealed")
        return
    _write(stamp, parts)


def use(root: str, gpu: str | None) -> str | None:
    """Point inductor and Triton at this machine's keyed folder under `root` (before anything compiles).
    Returns the folder, or None where none can be used (torch's defaults then apply)."""
    parts = components(gpu)
    path = folder(root, parts)
    try:
        with _locked(path):
            alone = _claim(path)
            try:
                _check(path, parts, prune=alone)
            except (OSError, ValueError) as e:
                if not alone:  # another process compiles into it: leave it be
                    raise OSError(f"{type(e).__name__}: {e}, and another process is using it") from e
                log.warning("compile cache %s can't be read (%s: %s); emptied, the blocks compile afresh", path,
                            type(e).__name__, e)
                _empty(path)
                _check(path, parts)
    except OSError as e:
        log.warning("compile cache %s can't be written (%s); using torch's default cache", path, e)
        return None
    # NOTE: read by inductor and Triton whenever they look for a cache entry, so it must be set before
    # the first compile of this process and never changed afterwards.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(path, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(path, "triton")
    return path
