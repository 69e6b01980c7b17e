"""What the plugin is doing, as one JSON document: `GET /xdit/status` and the `xdit.status` websocket event.

The router keeps only a few attributes that change at transitions (state, detail, last run, last
fallback); this module reads them, and its group's, in one `Router.snapshot()`. The ranks are asked (the existing "stats" request) only when
a client asks for the status and no sampling run is in progress, so the per-step path never waits on
it; between asks the last answer is served, stamped with when it was taken.

Nothing here imports ComfyUI's server at module level.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import sys
import threading
import time

from ..locate import CHECKOUT
from . import prestart

log = logging.getLogger(__name__)

EVENT = "xdit.status"
ROUTE = "/xdit/status"

# the states of the worker group, in the order a first run meets them
STATES = ("off", "idle", "starting", "loading", "compiling", "ready", "broken")


@dataclasses.dataclass
class _Plugin:
    off: str | None = None  # why the plugin is off (None: it attached)
    config: object = None
    router: object = None
    ranks: list | None = None  # the ranks' last answer to "stats"
    ranks_of: object = None  # the group that gave it (a restarted group's ranks are other processes)
    ranks_at: float | None = None
    ranks_error: str | None = None
    push: object = None  # callable(dict): sends the event to the browser(s)


_plugin = _Plugin()
_ask_lock = threading.Lock()


# --- what on_load tells us --------------------------------------------------------------------------
def plugin_off(reason: str, config=None) -> None:
    _plugin.off, _plugin.config = reason, config
    changed()


def attach(router) -> None:
    _plugin.off, _plugin.config, _plugin.router = None, router.config, router
    router.listeners.append(changed)


def reset() -> None:
    """Forget everything (tests that load the plugin more than once in one process)."""
    global _plugin
    _plugin = _Plugin()


# --- the document -----------------------------------------------------------------------------------
def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def settings(config) -> dict | None:
    if config is None:
        return None
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


_VERSIONS: dict = {}


def versions() -> dict:
    if not _VERSIONS:
        comfy = sys.modules.get("comfyui_version")
        if comfy is None:
            try:
                import comfyui_version as comfy
            except ImportError:
                comfy = None
        plugin = None
        try:
            import tomllib

            with open(os.path.join(CHECKOUT, "pyproject.toml"),
                      "rb") as f:
                plugin = tomllib.load(f)["project"]["version"]
        except (OSError, KeyError, ValueError):
            plugin = _version("comfy_xdit_patch")
        _VERSIONS.update(plugin=plugin, comfyui=getattr(comfy, "__version__", None), torch=_version("torch"),
                         ray=_version("ray"), python=sys.version.split()[0])
    return dict(_VERSIONS)


def _ask_ranks(group) -> None:
    """The ranks' own view: pid, device, memory, calls. One Stats request, only between sampling runs."""
    if not _ask_lock.acquire(blocking=False):  # another client is asking right now: serve its answer
        return
    try:
        # NOTE: not interruptible: ComfyUI's interrupt flag belongs to the prompt's thread, not to this web request
        _plugin.ranks, _plugin.ranks_of = group.stats(timeout=10, interruptible=False), group
        _plugin.ranks_at, _plugin.ranks_error = time.time(), None
    except Exception as e:  # a dying group: the router finds out on its next call and falls back
        _plugin.ranks_error = f"{type(e).__name__}: {e}"
    finally:
        _ask_lock.release()


def _ranks(seen_now: dict, group: dict, asked_of_this_group: bool) -> list[dict]:
    asked = {r["rank"]: r for r in _plugin.ranks or []} if asked_of_this_group else {}
    out = []
    for rank in range(group["world"]):
        seen = asked.get(rank, {})
        out.append({
            "rank": rank,
            "pid": group["pids"][rank] if rank < len(group["pids"]) else seen.get("pid"),
            "host": seen.get("host") or (group["hosts"][rank] if rank < len(group["hosts"]) else None),
            "device": seen.get("device"),
            "gpu": seen.get("gpu"),
            "memory": seen.get("memory"),
            "memory_peak": seen.get("memory_peak"),
            "calls": seen.get("calls"),
            "load_seconds": seen.get("load_seconds"),  # its last model preparation (weights, patches)
            "start_seconds": seen.get("start_seconds"),  # its process start, imports and GPU (group start)
            "weights": seen.get("weights"),  # its model's weights: sharded or not, bytes held (rank/weights.py)
            # NOTE: every routed call runs on every rank, so the driver's last routed call is each rank's
            "last_call": seen_now["last_call"],
            "state": seen_now["state"],
        })
    return out


def snapshot(ask_ranks: bool = False) -> dict:
    """The status document. ask_ranks: refresh the ranks' answer first (never during a sampling run)."""
    router = _plugin.router
    doc = {"enabled": router is not None, "reason": _plugin.off, "time": time.time(), "versions": versions(),
           "settings": settings(_plugin.config)}
    if router is None:
        doc.update(state="off", detail=_plugin.off, ranks=[], last_run=None, run=None, fallbacks=0, restarts=0,
                   last_fallback=None)
        return doc
    group_obj = router.group
    if ask_ranks and group_obj is not None and router.run is None and router.state == "ready":
        _ask_ranks(group_obj)
    now = router.snapshot()
    group = now.pop("group")
    disabled = now.pop("disabled")
    if disabled:
        doc.update(enabled=False, reason=disabled)
    doc.update(now, workers=router.config.workers, device="GPU" if router.config.use_gpu else "CPU",
               attention=group and group["attention"],
               ranks=_ranks(now, group, _plugin.ranks_of is group_obj) if group is not None else [],
               ranks_at=_plugin.ranks_at, ranks_error=_plugin.ranks_error,
               group_start_seconds=group and group["start_seconds"], group_start_phases=group and group["start_phases"],
               early_start=prestart.timeline())
    return doc


# --- ComfyUI's server ---------------------------------------------------------------------------------
# stages before a first run's first step, as ComfyUI's progress bar on the sampler node (stages done)
_STAGES = {"starting": 0, "loading": 1, "compiling": 2}


def _node_progress(state: str) -> None:
    """On the prompt's thread only (a node is executing): the node's bar moves through the stages, then
    the sampler's own bar takes over. NOTE: ComfyUI's hook raises its interrupt here, as in any node."""
    stage = _STAGES.get(state)
    context = sys.modules.get("comfy_execution.utils")
    if stage is None or context is None or context.get_executing_context() is None:
        return
    import comfy.utils

    try:
        comfy.utils.ProgressBar(len(_STAGES)).update_absolute(stage)
    except Exception as e:  # the bar is a courtesy
        log.debug("no progress bar: %s", e)


def changed() -> None:
    """A transition happened (router, group, end of a run, fallback): push the document to the browsers.
    Runs on whichever thread made the transition; raises only ComfyUI's interrupt."""
    router = _plugin.router
    if router is not None:
        _node_progress(router.state)
    push = _plugin.push
    if push is None:
        return
    try:
        push(snapshot())
    except Exception as e:  # the server's loop is closing (exit) or not there: nobody to tell
        log.debug("status event not sent: %s", e)


def serve(prompt_server) -> None:
    """`GET /xdit/status` on ComfyUI's own server, and the websocket event. Called once at plugin load,
    before ComfyUI adds its routes to the app."""
    import asyncio

    from aiohttp import web

    async def handler(request):
        # the ranks' answer waits on a socket: off the server's loop
        doc = await asyncio.get_running_loop().run_in_executor(None, snapshot, request.query.get("ranks") != "0")
        return web.json_response(doc)

    prompt_server.routes.get(ROUTE)(handler)
    _plugin.push = lambda doc: prompt_server.send_sync(EVENT, doc)
