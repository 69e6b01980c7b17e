"""ComfyUI's side of the two-node test (tests/test_multinode.py), run as its own process: the plugin joins
the cluster named by COMFY_XDIT_RAY_ADDRESS, and Ray stays out of pytest's process (which holds the
session's private cluster). Prints one JSON line: what each phase saw.

    python tests/multinode_driver.py MODEL NODE_PID [--measure N]

Phases: references with the plugin detached; cfg 1 (the two ranks' one sequence-parallel group spans the
nodes); cfg 3.5 (one CFG branch per node); the second node's processes (NODE_PID, its `ray start --block`, and all it started) killed at step 1 (that run falls
back); the next run (the cluster has no room: local, one log line). --measure N instead times N routed
calls of a larger latent and prints the per-call seconds and the bytes that crossed.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from comfy_xdit_patch import locate  # noqa: E402

locate.import_comfy(cpu=True)

import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402

import tiny  # noqa: E402
from comfy_xdit_patch import config as config_mod  # noqa: E402
from comfy_xdit_patch.driver import patch  # noqa: E402
from comfy_xdit_patch.tools.diagnostics import DriverProbe  # noqa: E402
from comfy_xdit_patch.wire import mesh as layout  # noqa: E402


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def sample(model, latent, cfg, steps=4, callback=None, seed=3):
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, latent["samples"],
                               callback=callback, disable_pbar=True, seed=seed)


def main() -> None:
    model_path, node_pid = sys.argv[1], int(sys.argv[2])
    measure = int(sys.argv[sys.argv.index("--measure") + 1]) if "--measure" in sys.argv else 0
    lines = Lines()
    logging.getLogger("comfy_xdit_patch").addHandler(lines)
    logging.getLogger("comfy_xdit_patch").setLevel(logging.INFO)
    config = config_mod.load(gpus=0)
    router = patch.install(config)
    model = comfy.sd.load_diffusion_model(model_path)
    out: dict = {}
    if measure:
        out["measure"] = time_calls(router, model, measure)
        print(json.dumps(out), flush=True)
        patch.uninstall()
        return
    latent = tiny.latent(64, 48)
    kept = patch.uninstall(close_group=False)
    refs = {cfg: sample(model, latent, cfg) for cfg in (1.0, 3.5)}
    router = patch.install(kept.config, router=kept)

    for cfg in (1.0, 3.5):
        group = router.life.get()
        group.channel.probe = probe = DriverProbe()  # counts the requests that crossed hosts
        before_routed = router.stats["routed_calls"]
        mark = len(lines.lines)
        img = sample(model, latent, cfg)
        group = router.group
        out[f"cfg{cfg}"] = {
            "diff": (img - refs[cfg]).abs().max().item(),
            "routed": router.stats["routed_calls"] - before_routed,
            "crossed": probe.crossed["call"],
            "ips": group.ips, "node_of": list(group.node_of),
            "layouts": {k[7:]: v for k, v in router.stats.items() if k.startswith("layout ")},
            "lines": [s for s in lines.lines[mark:] if "nodes in one group" in s],
            "spanning": {str(m): layout.spanning(m, group.node_of) for m in (layout.Mesh(1, 2, 1), layout.Mesh(2, 1, 1))},
        }

    # the second node goes away mid-run: its raylet and the rank on it are killed at step 1
    fallbacks, routed = router.stats["fallbacks"], router.stats["routed_calls"]

    def kill_node(step, *_):
        if step == 1:  # the node's `ray start` and all it started (Ray's workers have process groups of their own)
            import psutil

            root = psutil.Process(node_pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass

    img = sample(model, latent, 1.0, callback=kill_node)
    out["killed"] = {"diff": (img - refs[1.0]).abs().max().item(), "fallbacks": router.stats["fallbacks"] - fallbacks,
                     "routed": router.stats["routed_calls"] - routed, "active": router.active,
                     "group_closed": router.group is None}
    # the next run: the cluster now has room for one rank only
    mark, t0 = len(lines.lines), time.perf_counter()
    routed = router.stats["routed_calls"]
    img = sample(model, latent, 1.0)
    out["after"] = {"diff": (img - refs[1.0]).abs().max().item(), "seconds": time.perf_counter() - t0,
                    "routed": router.stats["routed_calls"] - routed, "active": router.active,
                    "lines": [s for s in lines.lines[mark:] if "comfy_xdit_patch" in s]}
    print(json.dumps(out), flush=True)
    patch.uninstall()


def time_calls(router, model, n: int) -> dict:
    """Seconds per routed call at two sizes and cfg 1 / 3.5 (after a warm-up run each), and of a request
    with no tensors that every rank answers (the channel's round trip alone)."""
    from comfy_xdit_patch.tools.diagnostics import DriverDiagnostics

    diag = DriverDiagnostics(router)
    timing = diag.timing  # seconds in routed calls, as ComfyUI's process sees them
    out = {}
    for size in (64, 256):
        for cfg in (1.0, 3.5):
            latent = tiny.latent(size, size)
            sample(model, latent, cfg, steps=2)
            calls, seconds = router.stats["routed_calls"], timing["call_seconds"]
            sample(model, latent, cfg, steps=n)
            calls, seconds = router.stats["routed_calls"] - calls, timing["call_seconds"] - seconds
            out[f"{size}px cfg{cfg} per call ms"] = round(1e3 * seconds / calls, 2)
    group = router.group
    t0 = time.perf_counter()
    for _ in range(50):
        group.stats()
    out["round trip ms"] = round(1e3 * (time.perf_counter() - t0) / 50, 2)
    out.update(ips=group.ips, shared=group.channel.shared, crossed=dict(diag.channel.crossed),
               layouts={k[7:]: v for k, v in router.stats.items() if k.startswith("layout ")})
    return out


if __name__ == "__main__":
    main()
