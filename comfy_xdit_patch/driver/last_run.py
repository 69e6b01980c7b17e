"""The last routed run, remembered for the next ComfyUI process, and run ahead there.

A process whose group started early (prestart.py) records the base model (file and loader, no LoRA) of
its last routed run under COMFY_XDIT_CACHE_DIR (`remember`), and that run's first model call (its inputs,
on the CPU: a few MB; `remember_call`). The next process's early group loads that model ahead (`preload`)
as soon as it is up, while ComfyUI is still loading or idle, when its files are unchanged, then runs the
call once, so the compiled blocks are traced and their kernels loaded before the first prompt. Another
model or resolution costs only its own load or compile.

The record holds the prompt's embeddings (the call's inputs): it is a file of the user's own, and the
record is read with an unpickler that resolves names only in modules already imported (`read`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys
import threading
import time

from ..errors import Unroutable, WorkerFailed
from ..wire.spec import ModelSpec, base_only

log = logging.getLogger("comfy_xdit_patch")

LAST = "last_model.pkl"  # under COMFY_XDIT_CACHE_DIR


@dataclasses.dataclass
class Record:
    """What one process leaves for the next (pickled). An older version's file reads as no record."""
    spec: ModelSpec  # the base model alone (wire.spec.base_only)
    call: "FirstCall | None" = None


@dataclasses.dataclass(frozen=True)
class FirstCall:
    world: int
    family: str
    mesh: object
    chunks: int | tuple[int, ...]
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class _Recorder:
    config: object
    record: Record | None = None


_recorder: _Recorder | None = None  # set by prestart.start: only a process that started early records


def record_for(config) -> None:
    global _recorder
    _recorder = _Recorder(config)


def _last_path(config) -> str:
    return os.path.join(os.path.expanduser(config.cache_dir), LAST)


def _write(config, record: Record) -> None:
    """Written for the user alone (it holds the prompt's embeddings): 0600, in a folder of mode 0700."""
    path = _last_path(config)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    part = f"{path}.{os.getpid()}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        pickle.dump(record, f)
    os.replace(part, path)


def remember(spec: ModelSpec) -> None:
    """After a routed run of a process that started early: its base model, for the next process. Never
    raises (the record is a convenience)."""
    rec = _recorder
    if rec is None or (rec.record is not None and rec.record.spec.base_key == spec.base_key):
        return
    try:
        rec.record = Record(base_only(spec))
        _write(rec.config, rec.record)
    except Exception as e:
        log.debug("comfy_xdit_patch: the last model was not recorded (%s: %s)", type(e).__name__, e)


def remember_call(spec: ModelSpec, world: int, family: str, mesh, chunks, args: tuple, kwargs: dict) -> None:
    """After the first routed call of the remembered model (once a process): that call, its tensors copied
    to the CPU, for the next process's group to run once ahead. Never raises."""
    rec = _recorder
    if rec is None or rec.record is None or rec.record.call is not None or rec.record.spec.base_key != spec.base_key:
        return
    import torch
    from torch.utils import _pytree as pytree

    try:  # clone: a CPU tensor that views a larger one would be pickled with all of its storage
        args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().cpu().clone(), (args, kwargs))
        rec.record.call = FirstCall(world, family, mesh, chunks, args, kwargs)
        _write(rec.config, rec.record)
    except Exception as e:
        log.debug("comfy_xdit_patch: the last call was not recorded (%s: %s)", type(e).__name__, e)


class _NotImported(Exception):
    pass


class _Imported(pickle.Unpickler):
    """Resolves names only in modules already imported: the early thread never imports one of ComfyUI's
    (or a node pack's, like a GGUF loader) while ComfyUI itself may be importing it on its main thread."""

    def find_class(self, module, name):
        obj = sys.modules.get(module)
        try:
            for part in name.split("."):
                obj = getattr(obj, part)  # a module still being imported may lack it yet
        except AttributeError:
            obj = None
        if obj is None:
            raise _NotImported(f"{module}.{name}")
        return obj


def read(config, wanted: threading.Event, cancelled: threading.Event, deadline: float) -> Record | None:
    """The last run's record, once ComfyUI has imported what it names (its loader), or None: none recorded,
    unreadable (another version wrote it), or what it names never got imported by the time the first run
    wanted the group."""
    while True:
        last_try = wanted.is_set() or time.monotonic() > deadline  # prestart.want(): a run wants the group
        try:
            with open(_last_path(config), "rb") as f:
                record = _Imported(f).load()
            return record if isinstance(record, Record) and isinstance(record.spec, ModelSpec) else None
        except _NotImported as e:
            if last_try or cancelled.is_set():
                log.info("comfy_xdit_patch: the last run's model was not loaded ahead (%s is not imported)", e)
                return None
            wanted.wait(0.1)
        except Exception:
            return None


def preload(group, record: Record, reached=lambda step: None) -> bool:
    """Load the model the last process used, then run its first call once; whether the model was loaded.
    A failure that leaves the group healthy is logged and forgotten: the model can't be loaded, or its
    files changed or are gone since (each rank checks the spec's file stamps before it loads, as for any
    run, and refuses), or the call is refused. NOTE: not interruptible: ComfyUI's interrupt is meant for a
    prompt, which this is not."""
    spec, t0 = record.spec, time.perf_counter()
    try:
        group.prepare(spec, interruptible=False)
    except (Unroutable, WorkerFailed) as e:  # a rank refused or raised, and serves on (else: raised)
        log.info("comfy_xdit_patch: the last run's model was not loaded ahead (%s)", e)
        return False
    reached("model")
    log.info("comfy_xdit_patch: loaded the last run's model ahead on %d ranks in %.1f s", group.world,
             time.perf_counter() - t0)
    call = record.call
    if call is None or call.world != group.world:
        return True
    t0 = time.perf_counter()
    try:
        group.call(spec.key, call.family, call.mesh, call.chunks, call.args, call.kwargs,
                   timeout=group.config.load_timeout, interruptible=False)
    except (Unroutable, WorkerFailed) as e:
        log.info("comfy_xdit_patch: the last run's first call did not run ahead (%s)", e)
        return True
    reached("compiled")
    log.info("comfy_xdit_patch: ran the last run's first call ahead (%s) in %.1f s", call.mesh,
             time.perf_counter() - t0)
    return True
