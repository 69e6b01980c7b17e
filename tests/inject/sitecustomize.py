"""Test-only, never shipped: holds a process at a known moment, so that a test lands a fault exactly there.

Python imports `sitecustomize` at start-up from its path; test servers put this folder on PYTHONPATH (Ray's
workers inherit it). Nothing in the plugin knows about it; each hold wraps a function when its module is
first imported:
- XDIT_TEST_PAUSE="prepare=1" or "init=15": a rank sleeps that long at the start of Worker.prepare /
  Worker.__init__, after logging "diag: pausing 1s in prepare" (a tiny model loads too fast to hit
  otherwise; a prompt can come before the ranks are up).
- XDIT_TEST_HOLD="K:DIR": in ComfyUI's process, when DIR/arm exists, the sampler's step callback at step K
  removes it, logs "diag: holding at step K", and waits (60 s at most) until DIR/go exists: the fault
  lands while sampling is under way, at a known step, whatever the machine's speed.
"""
import os

_PAUSES = dict(p.split("=", 1) for p in os.environ.get("XDIT_TEST_PAUSE", "").split(",") if "=" in p)
_HOLD = os.environ.get("XDIT_TEST_HOLD", "")

if _PAUSES or _HOLD:
    import functools
    import importlib.util
    import sys
    import threading
    import time

    def _say(text: str) -> None:
        print(f"diag: {text}", file=sys.stderr, flush=True)

    def _paused(moment: str, seconds: float, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            _say(f"pausing {seconds:g}s in {moment}")
            time.sleep(seconds)
            return method(*args, **kwargs)

        return wrapper

    def _pause_worker(module) -> None:
        for moment, seconds in _PAUSES.items():
            name = {"init": "__init__", "prepare": "prepare"}[moment]
            setattr(module.Worker, name, _paused(moment, float(seconds), getattr(module.Worker, name)))

    def _hold_sampler(module) -> None:
        step, folder = _HOLD.split(":", 1)
        arm, go = os.path.join(folder, "arm"), os.path.join(folder, "go")
        prepare = module.prepare_callback

        @functools.wraps(prepare)
        def prepare_callback(*args, **kwargs):
            callback = prepare(*args, **kwargs)

            def held(i, *rest):
                if i == int(step) and os.path.exists(arm):
                    os.remove(arm)
                    _say(f"holding at step {i}")
                    deadline = time.monotonic() + 60
                    while not os.path.exists(go) and time.monotonic() < deadline:
                        time.sleep(0.02)
                    if os.path.exists(go):
                        os.remove(go)
                return callback(i, *rest)

            return held

        module.prepare_callback = prepare_callback

    _PATCHES = {"comfy_xdit_patch.rank.worker": _pause_worker if _PAUSES else None,
                "latent_preview": _hold_sampler if _HOLD else None}

    class _Finder:
        """Runs a patch right after its module is executed. It stays on sys.meta_path and steps aside by a flag
        of its own thread: removing itself for the nested find_spec, as it once did, changed the list while
        ComfyUI's main thread was walking it for another import (the early-start thread imports too), and that
        import then missed the path finder ("No module named 'comfy.ldm.hunyuan_video.model'")."""

        def __init__(self):
            self.finding = threading.local()

        def find_spec(self, name, path=None, target=None):
            if getattr(self.finding, "on", False) or _PATCHES.get(name) is None:
                return None
            patch = _PATCHES.pop(name)
            self.finding.on = True
            try:
                spec = importlib.util.find_spec(name)
            finally:
                self.finding.on = False
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
