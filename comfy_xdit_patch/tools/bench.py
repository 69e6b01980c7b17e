"""Side-by-side benchmark: unpatched ComfyUI on one GPU vs the plugin on N ranks, in one run.

    comfy-xdit bench [--model flux1-dev|flux2-dev|flux2-klein-4b|wan2.1-14b|wan2.2-ti2v-5b] [--sizes 1024,2048]
                     [--frames 81 | --short] [--steps 20] [--ranks 1,2,4] [--layouts "ulysses=2,ring=2"]
                     [--cfg 1,3.5] [--gpu-cap GB] [--checkpoint FILE] [--weights bf16|fp8|gguf-q8_0|gguf-f16]
                     [--out DIR]

Everything runs in this process, which plays ComfyUI's process: ComfyUI's own sampler
(`comfy.sample.sample`, as KSampler does), the model's real shapes (synthetic weights with the real
key names, tools/bench_models.py, written once to --workdir so the ranks load them from disk in parallel)
or a checkpoint. First ComfyUI alone (and + TorchCompileModel, and held to --gpu-cap), then the plugin
attached with each rank count / layout. Prints a table and writes bench.json (+ bench.png); `--tiny` runs
the same on a CPU with a tiny model of the family.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time

from .. import config as cfgmod
from .. import locate
from . import bench_args, bench_models, plot, report
from .diagnostics import DriverDiagnostics


class Bench:
    def __init__(self, a):
        self.a = a
        self._lora = None  # see with_lora
        import torch

        self.torch = torch
        self.gpus = 0 if a.tiny else cfgmod.visible_gpus()
        self.model = bench_models.MODELS[a.model]
        self.sizes = [int(s) if s.isdigit() else s for s in a.sizes.split(",")]  # row labels: 1024, "480p"
        self.cfgs = [float(c) for c in a.cfg.split(",")]
        self.baselines = (a.baselines or ("eager" if a.tiny else "eager,compiled")).split(",")
        self.results = {"machine": self._machine(), "args": vars(a), "baseline": [], "runs": []}
        os.makedirs(a.out, exist_ok=True)

    def _machine(self) -> dict:
        torch = self.torch
        gpus = [torch.cuda.get_device_name(i) for i in range(self.gpus)]
        return {"gpus": gpus, "torch": torch.__version__, "python": platform.python_version(),
                "host": platform.node()}

    def _save(self) -> None:
        with open(os.path.join(self.a.out, "bench.json"), "w") as f:
            json.dump(self.results, f, indent=1, default=str)

    # --- model and inputs ---------------------------------------------------------------------------
    def model_path(self) -> str:
        if self.a.checkpoint:
            return self.a.checkpoint
        t0 = time.perf_counter()
        self.stored = bench_models.stored_dtype(self.model, self.a.weights, self.a.workdir, self.a.store)
        path = bench_models.synthetic_file(self.model, self.a.workdir, self.a.tiny, self.stored)
        self.results["weights_written_seconds"] = time.perf_counter() - t0
        return path

    def load(self):
        """The model as the --weights loader makes it (what ComfyUI alone and the plugin both run)."""
        from . import weights

        t0 = time.perf_counter()
        path = self.model_path()
        as_bf16 = not self.a.tiny and self.a.weights == "bf16" and self.stored == self.torch.float8_e4m3fn
        patcher = weights.load(self.a.weights, path, self.a.workdir, "cpu" if self.a.tiny else "cuda", as_bf16,
                               arch=self.model.family)
        self.results["weights"] = {"kind": self.a.weights, "stored": str(getattr(self, "stored", "")),
                                   "load_s": time.perf_counter() - t0, "model": self.model.name}
        return patcher

    def conds(self):
        return bench_models.conds(self.model, self.a.tiny)

    def _tokens(self, size) -> int:
        w, h = bench_models.size(str(size))
        tiny_text = self.model.text[0] - 8 if self.a.tiny and self.model.family == "flux" else 0  # 8 text tokens
        return self.model.tokens(w, h, self.a.frames) - tiny_text

    def latent(self, size, cfg: float = 1.0) -> tuple:
        """The latent's shape (a CFG > 1 call's batch: 2)."""
        w, h = bench_models.size(str(size))
        return self.model.latent_shape(w, h, self.a.frames, 2 if cfg != 1 else 1)

    def with_lora(self, patcher):
        """The model + a synthetic LoRA, built once (ComfyUI alone and the plugin runs share it)."""
        import comfy.sd

        from . import synthetic

        if self._lora is None:
            sd = patcher.model.diffusion_model.state_dict()
            lora = synthetic.lora(sd, rank=self.a.lora, **bench_models.lora_targets(self.model))
            self._lora = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)[0]
        return self._lora

    def sample(self, patcher, size, cfg, steps):
        import comfy.sample

        torch = self.torch
        latent = torch.zeros(self.latent(size))
        noise = comfy.sample.prepare_noise(latent, 42)
        pos, neg = self.conds()
        if self.gpus:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = comfy.sample.sample(patcher, noise, steps, cfg, "euler", "simple", pos, neg, latent,
                                  disable_pbar=True, seed=42)
        out = out.float().cpu()
        return out, time.perf_counter() - t0

    # --- the two sides ------------------------------------------------------------------------------
    def baseline(self, patcher) -> dict:
        """ComfyUI alone (+ TorchCompileModel, + LoRA, held to --gpu-cap): tools/bench_alone.py."""
        from . import bench_alone

        return bench_alone.run(self, patcher)

    def _baseline(self, size, cfg, compiled=False, lora=False, capped=False):
        return report.baseline(self.results, size, cfg, compiled, lora, capped)

    def config(self, workers: int, parallel: str, env: dict):
        settings = {"COMFY_XDIT": "1", "COMFY_XDIT_WORKERS": str(workers), "COMFY_XDIT_PARALLEL": parallel or "auto",
                    "COMFY_XDIT_WHILE_STARTING": "wait", **env}  # the first run is the plugin's, timed
        return cfgmod.load(settings, gpus=self.gpus)

    def prestart(self, workers: int, env: dict):
        """As ComfyUI's start does (COMFY_XDIT_PRESTART): the group starts while the weights are written
        and ComfyUI alone is timed, before the plugin is attached."""
        from ..driver.router import Router

        router = Router(self.config(workers, "", env))
        router.prestart()
        return router

    def plugin(self, patcher, workers: int, parallel: str, env: dict, latents: dict, label: str,
               cfgs: list | None = None, early=None) -> None:
        from ..driver import patch

        torch = self.torch

        router = patch.install(self.config(workers, parallel, env), early)
        diag = DriverDiagnostics(router)
        try:
            t0 = time.perf_counter()
            self.sample(patcher, self.sizes[0], self.cfgs[0], 1)
            first = time.perf_counter() - t0
            if router.group is None:
                raise RuntimeError(f"the plugin did not route: {router.disabled or router.stats}")
            group = diag.ready()
            start = {"group_start_s": group.start_seconds, "first_run_s": first, "prestarted": early is not None,
                     "group_wait_s": max(0.0, group.ready_at - t0),
                     "load_s": max(s["load_seconds"] for s in group.stats())}
            print(f"{label}: group start took {start['group_start_s']:.1f} s, the first call waited "
                  f"{start['group_wait_s']:.1f} s for it, weights loaded in {start['load_s']:.1f} s "
                  f"(ranks in parallel), first 1-step run {first:.1f} s", flush=True)
            cases = [(patcher, size, cfg, "") for size in self.sizes for cfg in (cfgs or self.cfgs[:1])]
            if self.a.lora and workers == 2 and label.startswith("auto,"):
                cases.append((self.with_lora(patcher), self.sizes[0], self.cfgs[0], f" + LoRA r{self.a.lora}"))
            for model, size, cfg, extra in cases:
                self.sample(model, size, cfg, self.a.warmup)
                if router.disabled or router.group is not group:
                    raise RuntimeError(f"the plugin stopped routing during the warm-up: {router.disabled or 'group restarted'}")
                group.stats(reset=True)
                calls0, wall0 = router.stats["routed_calls"], diag.timing["call_seconds"]
                parts0 = dict(diag.channel.timing, route=diag.timing["route_seconds"])
                clock0 = dict(diag.channel.clock)
                profiler = None
                if self.a.profile and not self.results.get("profiled"):
                    import cProfile

                    profiler = cProfile.Profile()
                    diag.pyprofile(True)
                    profiler.enable()
                latent, seconds = self.sample(model, size, cfg, self.a.steps)
                if profiler is not None:
                    profiler.disable()
                    self._dump_profile(profiler, label, size, diag.pyprofile(False)[0])
                stats = group.stats()
                calls = router.stats["routed_calls"] - calls0
                per_call = (diag.timing["call_seconds"] - wall0) / max(calls, 1)
                rank_calls = max(stats[0]["calls"], 1)
                busy, gpu, launch, reply = (stats[0][k] / rank_calls for k in
                                            ("busy_seconds", "gpu_seconds", "launch_seconds", "reply_seconds"))
                launch_parts = {k: round(v / rank_calls * 1e3, 2) for k, v in stats[0]["launch_parts_seconds"].items()}
                inbound = max(s["inbound_seconds"] for s in stats) / rank_calls
                parts = dict(diag.channel.timing, route=diag.timing["route_seconds"])
                parts = {k: (v - parts0.get(k, 0.0)) / max(calls, 1) for k, v in parts.items()}
                parts["wait_minus_compute"] = parts.pop("wait", 0.0) - busy
                parts["rank_inbound"] = inbound
                parts["rank0_reply"] = reply
                if group.channel.shared:  # one host: one clock. Header to rank 0, rank 0 beyond its compute
                    # (its reply staged), reply to ComfyUI's process
                    sent, woke = (diag.channel.clock[f"call {k}"] - clock0.get(f"call {k}", 0.0) for k in ("sent", "woke"))
                    clock = stats[0]["clock"]
                    parts["to_rank0"] = (clock.get("call arrived", 0.0) - sent) / rank_calls
                    parts["rank0_beyond_compute"] = (clock.get("call done", 0.0) - clock.get("call arrived", 0.0)) / rank_calls - busy
                    parts["back"] = (woke - clock.get("call done", 0.0)) / rank_calls
                shape = self.latent(size, cfg)
                chunks = [c for (s, _), c in router.tuner.best.items() if s == shape]
                row = {"label": label + extra, "workers": workers, "chunks": chunks, "lora": extra,
                       "parallel": parallel or "auto", "env": env,
                       "size": size, "cfg": cfg, "s_per_step": seconds / self.a.steps, "routed_calls": calls,
                       "compute_s": busy, "gpu_span_s": gpu, "launch_s": launch, "launch_parts_ms": launch_parts,
                       "dispatch_s": per_call - busy, "inbound_s": inbound,
                       "dispatch_parts_ms": {k: round(v * 1e3, 3) for k, v in parts.items()},
                       "exchange": stats[0].get("exchange"),
                       "pinned": {"driver": group.channel.pinned, "ranks": [s["pinned"] for s in stats]},
                       "graph_replays": stats[0]["graph_replays"],
                       "sampler_s": seconds / self.a.steps - per_call * calls / self.a.steps,
                       "a2a_s": diag.exchange_seconds(shape, self._tokens(size), 2 if self.a.tiny else self.model.heads,
                                                      4 if self.a.tiny else self.model.blocks, tiny=self.a.tiny),
                       "peak_gib": [s["memory_peak"] / 2**30 for s in stats],
                       "rank_rss_peak_gib": [s["host_memory"].get("rss_peak", 0) / 2**30 for s in stats],
                       "weights": [s["weights"] for s in stats],
                       "main_gpu_gib": torch.cuda.memory_allocated() / 2**30 if self.gpus else 0.0,
                       "psnr_db": report.psnr(latents[("lora", size, cfg) if extra else (size, cfg)], latent), **start}
                row["speedup"] = self._baseline(size, cfg, lora=bool(extra))["s_per_step"] / row["s_per_step"]
                compiled = None if extra else self._baseline(size, cfg, compiled=True)
                row["speedup_vs_compiled"] = compiled["s_per_step"] / row["s_per_step"] if compiled else None
                capped = None if extra else self._baseline(size, cfg, capped=True)
                row["speedup_vs_capped"] = capped["s_per_step"] / row["s_per_step"] if capped else None
                self.results["runs"].append(row)
                if self.a.kernel_profile and self.gpus:
                    diag.profile(os.path.dirname(self._profile_prefix(f"{label}{extra}-{size}-cfg{cfg:g}", "x")))
                    # one call eager, one as usual: a run like the timed one, so that its graph is replayed
                    self.sample(model, size, cfg, self.a.steps)
                print(f"{row['label']:<22} {size} cfg {cfg:g}: {row['s_per_step']:.4f} s/step  x{row['speedup']:.2f}  "
                      f"compute {busy * 1e3:.1f} ms (GPU span {gpu * 1e3:.1f}, queued after {launch * 1e3:.1f}, "
                      f"parts (ms) {launch_parts}), "
                      f"dispatch {row['dispatch_s'] * 1e3:.2f} ms, "
                      f"a2a {row['a2a_s'] * 1e3:.1f} ms, PSNR {row['psnr_db']:.1f} dB, "
                      f"peak {max(row['peak_gib']):.1f} GiB, chunks {chunks}, sampler {row['sampler_s'] * 1e3:.1f} ms, "
                      f"exchange {row['exchange']}, page-locked {row['pinned']}, dispatch parts (ms) {row['dispatch_parts_ms']}",
                      flush=True)
                self._save()
            if extra_lora := [c for c in cases if c[3]]:
                self.results["lora_ab"] = self.lora_ab(patcher, extra_lora[0][0])
                self._save()
        finally:
            patch.uninstall()

    def lora_ab(self, off, on) -> dict:
        """LoRA on vs off, interleaved (off, on, off, on, ...) so drifting clocks hit both alike."""
        import statistics

        size, cfg = self.sizes[0], self.cfgs[0]
        times = {"off": [], "on": []}
        for _ in range(5):
            for tag, model in (("off", off), ("on", on)):
                self.sample(model, size, cfg, 3)  # the ranks re-sync their weights and re-capture
                times[tag].append(self.sample(model, size, cfg, self.a.steps)[1] / self.a.steps)
        ratio = statistics.median(times["on"]) / statistics.median(times["off"])
        print(f"LoRA r{self.a.lora} on vs off, 2 ranks {size}², interleaved x5: off {times['off']}, on {times['on']} "
              f"s/step -> on/off {ratio:.4f}", flush=True)
        return {"size": size, "cfg": cfg, "off_s_per_step": times["off"], "on_s_per_step": times["on"],
                "on_over_off": ratio}

    def _profile_prefix(self, case: str, name: str) -> str:
        slug = "".join(c if c.isalnum() or c in "-." else "_" for c in case)
        return os.path.abspath(os.path.join(self.a.out, "profile", slug, name))

    def _dump_profile(self, profiler, label, size, rank0: str) -> None:
        from .profiling import table

        with open(os.path.join(self.a.out, "profile.txt"), "w") as f:
            f.write(f"{label} {size}² {self.a.steps} steps\n" + table(profiler) + table(profiler, 60, "cumulative"))
            f.write(f"\n--- rank 0's serving loop, the same run\n{rank0}")
        self.results["profiled"] = label


def _settings(text: str) -> dict:
    """'NAME=value;NAME=value' -> {NAME: value}"""
    return dict(x.split("=", 1) for x in text.split(";") if x)


def main(argv=None) -> int:
    a = bench_args.parse(argv, __doc__)
    locate.import_comfy(cpu=True if a.tiny else None)
    bench = Bench(a)
    ranks = [int(r) for r in a.ranks.split(",")] if a.ranks else sorted({1, 2, max(2, bench.gpus)})
    env = _settings(a.env)
    if a.gpu_cap:  # the ranks are held to the cap that ComfyUI alone capped had
        env.setdefault("COMFY_XDIT_GPU_CAP", f"{a.gpu_cap:g}")
    early = bench.prestart(ranks[0], env) if env.get("COMFY_XDIT_PRESTART", "1") == "1" else None
    patcher = bench.load()
    latents = bench.baseline(patcher)
    cfg_ranks = {int(r) for r in a.cfg_ranks.split(",") if r}

    def run(label, *args, **kw):  # one configuration's failure is recorded; the others still run
        try:
            bench.plugin(patcher, *args, latents, label, **kw)
        except Exception as e:
            print(f"{label}: FAILED {type(e).__name__}: {e}", flush=True)
            bench.results.setdefault("failed", []).append({"label": label, "error": f"{type(e).__name__}: {e}"})
            bench._save()

    for i, n in enumerate(ranks):
        run(f"auto, {n} rank(s)", n, "", env, cfgs=bench.cfgs if n in cfg_ranks else None,
            early=early if i == 0 else None)
    for layout in filter(None, a.layouts.split(";")):
        degrees = dict(kv.split("=") for kv in layout.split(","))
        run(layout, math.prod(int(v) for v in degrees.values()), layout, env)
    for variant in filter(None, a.variants.split("|")):
        n, _, variant = variant.rpartition(":")
        extra = _settings(variant)
        run(f"{int(n or 2)} ranks " + ",".join(f"{k[11:].lower()}={v}" for k, v in extra.items()),
            int(n or 2), "", {**env, **extra})
    table = report.table(bench.results)
    print(table)
    with open(os.path.join(a.out, "bench.md"), "w") as f:
        f.write(table + "\n")
    bench._save()
    plot.speedups(bench.results, os.path.join(a.out, "bench.png"))
    return 1 if bench.results.get("failed") else 0
