"""Test-only, never shipped: holds a rank at a known moment, so that a test can land a fault there (a tiny model
loads too fast to hit otherwise) or send a prompt before the ranks are up.

Python imports `sitecustomize` at start-up from its path; test servers put this folder on PYTHONPATH (Ray's
workers inherit it) with XDIT_TEST_PAUSE="prepare=1" or "init=15". When a process imports the rank's module,
the named Worker methods are wrapped to log a line ("diag: pausing 1s in prepare", read from the rank's log)
and sleep first. Nothing in the plugin knows about it.
"""
import os

_PAUSES = dict(p.split("=", 1) for p in os.environ.get("XDIT_TEST_PAUSE", "").split(",") if "=" in p)
_MODULE = "comfy_xdit_patch.rank.worker"
_METHODS = {"init": "__init__", "prepare": "prepare"}

if _PAUSES:
    import functools
    import importlib.util
    import sys
    import time

    def _paused(moment: str, seconds: float, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            print(f"diag: pausing {seconds:g}s in {moment}", file=sys.stderr, flush=True)
            time.sleep(seconds)
            return method(*args, **kwargs)

        return wrapper

    class _Finder:
        """Wraps the Worker's methods once its module is executed (a meta path finder that steps aside after)."""

        def find_spec(self, name, path=None, target=None):
            if name != _MODULE:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                for moment, seconds in _PAUSES.items():
                    method = _METHODS[moment]
                    setattr(module.Worker, method, _paused(moment, float(seconds), getattr(module.Worker, method)))

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
