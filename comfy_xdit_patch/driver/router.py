"""Routing FLUX model calls to the worker group, through ComfyUI's own wrapper seams.

- `sample` (wrapt, around comfy.samplers.CFGGuider.sample): for a FLUX-family model, adds our
  OUTER_SAMPLE wrapper to that sampling run's copy of model_options. Nothing else is touched.
- OUTER_SAMPLE: opens a run (worker group up, model prepared on the workers, object patches applied
  here without loading weights), adds the DIFFUSION_MODEL wrapper last, closes the run afterwards.
- DIFFUSION_MODEL: sends the call to the workers; if the input can't be routed, or anything fails,
  it calls `executor` (ComfyUI's own forward) after loading the model here as ComfyUI would.
- `load_models_gpu` (wrapt): while a run is routed, ComfyUI's process skips loading that model.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension as pe
import torch

from .. import plans
from ..config import Config
from ..errors import ClusterUnreachable, GroupBroken, LayoutError, Unroutable, classify
from ..wire.mesh import choose_mesh, spanning
from . import last_run, prestart
from .calls import check
from .life import GroupLife
from .models import spec_for
from .tuning import ChunkTuner

log = logging.getLogger("comfy_xdit_patch")

KEY = "comfy_xdit_patch"


@dataclasses.dataclass
class Run:
    patcher: object
    plan: plans.Plan
    spec: object = None
    local: bool = False  # the rest of this run stays in ComfyUI's process
    loaded_here: bool = False  # ComfyUI's process loaded the weights (then it owns their state)
    routed: int = 0
    here: int = 0
    size: str = ""  # of the first routed call, as pixels, e.g. "1024x1024" (pixel_size)
    layout: str = ""


def pixel_size(patcher, shape) -> str:
    """A latent's size in pixels, as the status shows it: "1024x1024", a video's frames after it ("832x480, 81
    frames"), through the model's latent format (8 pixels a latent cell for FLUX.1 and Wan 2.1, 16 for FLUX.2
    and Wan 2.2 TI2V-5B; a causal video VAE's first latent frame is one frame, each next one `temporal`)."""
    latent_format = patcher.get_model_object("latent_format")
    cell = getattr(latent_format, "spacial_downscale_ratio", 8)
    size = f"{shape[-1] * cell}x{shape[-2] * cell}"
    if len(shape) == 5:
        size += f", {(shape[2] - 1) * getattr(latent_format, 'temporal_downscale_ratio', 1) + 1} frames"
    return size


class Router:
    def __init__(self, config: Config, on_disable=lambda: None):
        self.config = config
        self.life = GroupLife(config, self._set)
        self.run: Run | None = None
        self.stats = collections.Counter()
        self.tuner = ChunkTuner(config.a2a_chunks)
        self.disabled: str | None = None
        self._on_disable = on_disable
        self._said: set = set()
        # what status.py reads; set at transitions only, never per call
        self.state, self.detail = "idle", "the worker group starts on the first FLUX run"
        self.last_run = self.last_fallback = self.last_call = None
        self.listeners: list = []  # callables, told after every transition (status.changed)
        self._warm: set = set()  # (shape, layout) the current group has run: a new one compiles first
        self._current = None  # the spec key the group holds

    def _set(self, state: str, detail: str = "") -> None:
        self.state, self.detail = state, detail
        self._tell()

    def _tell(self) -> None:
        for listener in self.listeners:
            listener()

    @property
    def group(self):
        return self.life.group

    @property
    def restarts(self) -> int:
        return self.life.restarts

    def prestart(self):
        return self.life.prestart()

    def snapshot(self) -> dict:
        """What the status document shows of this Router and its group, read in one go (driver/status.py)."""
        group, run = self.group, self.run
        return {
            "state": self.state, "detail": self.detail, "disabled": self.disabled,
            "group": None if group is None else {
                "world": group.world, "pids": list(group.pids), "hosts": list(group.ips), "attention": group.attention,
                "start_seconds": group.start_seconds, "start_phases": dict(group.start_phases)},
            "run": None if run is None else {"routed": run.routed, "local": run.here},
            "last_run": self.last_run, "last_fallback": self.last_fallback, "last_call": self.last_call,
            "fallbacks": self.stats["fallbacks"], "restarts": self.life.restarts, "group_starts": self.life.starts,
            "runs_while_starting": self.stats["runs_while_starting"], "routed_calls": self.stats["routed_calls"],
            "local_calls": self.stats["local_calls"], "next_try": self.life.next_try,
        }

    @property
    def active(self) -> bool:
        return self.disabled is None

    def _once(self, key, msg: str, *args) -> None:
        if key not in self._said:
            self._said.add(key)
            log.info(msg, *args)

    # --- patched entry points ---------------------------------------------------------------------
    def sample(self, wrapped, guider, args, kwargs):
        patcher = guider.model_patcher
        if not self.active or plans.plan_for(patcher.model.diffusion_model) is None:
            return wrapped(*args, **kwargs)
        original = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        pe.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, self.outer_sample, guider.model_options,
                                is_model_options=True)
        try:
            return wrapped(*args, **kwargs)
        finally:
            guider.model_options = original

    def load_models_gpu(self, wrapped, _instance, args, kwargs):
        run = self.run
        models = args[0] if args else kwargs.get("models")
        if run is None or run.local or not any(m is run.patcher for m in models):
            return wrapped(*args, **kwargs)
        kept = [m for m in models if m is not run.patcher]
        if args:
            return wrapped(kept, *args[1:], **kwargs)
        return wrapped(**dict(kwargs, models=kept))

    # --- OUTER_SAMPLE: one sampling run -------------------------------------------------------------
    def outer_sample(self, executor, *args, **kwargs):
        self.life.sampling += 1  # the idle watch leaves the group to a run, from its start to its end
        try:
            return self._outer_sample(executor, *args, **kwargs)
        finally:
            self.life.sampling -= 1

    def _outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        patcher = guider.model_patcher
        if not self.active:
            return executor(*args, **kwargs)
        if hasattr(patcher, "get_additional_models_with_key") and patcher.get_additional_models_with_key("multigpu"):
            self._once(("multigpu", id(patcher.model)), "comfy_xdit_patch: core MultiGPU CFG Split is on this "
                       "model; stepping aside for it")
            return executor(*args, **kwargs)
        if self._not_yet(patcher):
            return executor(*args, **kwargs)
        run = Run(patcher, plans.plan_for(patcher.model.diffusion_model))
        opened = time.time()
        try:
            self._open(run)
        except Exception as e:
            self._failed(e, "preparing the worker group")
            return executor(*args, **kwargs)
        pe.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, KEY, self.sampler_sample, guider.model_options,
                                is_model_options=True)
        pe.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, KEY, self.diffusion_model, guider.model_options,
                                is_model_options=True)
        self.run = run
        started = time.time()
        try:
            out = executor(*args, **kwargs)
        finally:
            self.run = None
            if not run.loaded_here:
                patcher.unpatch_model(unpatch_weights=False)  # object patches back as they were
        if not run.local:
            self.life.restarts = 0  # the restart budget counts consecutive failing runs
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        steps = max(len(sigmas) - 1, 1) if sigmas is not None else 1
        ended = time.time()
        self.last_run = {"routed": run.routed, "local": run.here, "workers": self.config.workers,
                         "layout": run.layout, "size": run.size, "steps": steps, "ended": ended,
                         "prepare_seconds": started - opened, "seconds": ended - opened,
                         "s_per_step": (ended - started) / steps}
        self._tell()
        log.info("comfy_xdit_patch: %d of %d model calls ran on the %d-rank worker group", run.routed,
                 run.routed + run.here, self.config.workers)
        return out

    def _not_yet(self, patcher) -> bool:
        """Whether this run stays in ComfyUI's process, as without the plugin, because the group started in the
        background (prestart) is not ready yet (COMFY_XDIT_WHILE_STARTING=local): the first image after a start then comes
        as soon as ComfyUI alone's, not after Ray, the ranks and their weights. Only where ComfyUI's GPU can
        hold its own copy beside rank 0's (and what the run needs besides) until the next run frees it."""
        if self.group is not None or self.life.starting is None or self.config.while_starting != "local":
            return False
        if self.config.use_gpu:
            device = comfy.model_management.get_torch_device()
            if comfy.model_management.get_total_memory(device) < 2.5 * patcher.model_size():
                return False
        self.stats["runs_while_starting"] += 1
        log.info("comfy_xdit_patch: the worker group is still starting; this run stays in ComfyUI's process")
        return True

    def _open(self, run: Run) -> None:
        # NOTE: weights this process still holds from an earlier local run would sit beside rank 0's.
        comfy.model_management.unload_model_and_clones(run.patcher, unload_additional_models=False)
        # NOTE: ComfyUI alone makes room on its GPU before it loads the model (a text encoder leaves a small card); a
        # rank on that GPU loads it instead, so this process frees that room the same way first
        mm = comfy.model_management
        mm.free_memory(run.patcher.model_size() + mm.minimum_inference_memory(), run.patcher.load_device)
        forced = self.config.parallel
        if forced is not None:  # an impossible forced layout is refused before sampling starts
            choose_mesh(forced.world, forced.cfg, plans.head_count(run.plan, run.patcher.model.diffusion_model),
                                     forced, ring_ok=True, gather=self.config.attention == "gather")
        prestart.want()  # a run waits for the group: the last model's record is not waited for any longer
        group = self.life.get()
        run.spec = spec_for(run.patcher)
        if run.spec.key != self._current:
            self._set("loading", f"loading {run.plan.family.upper()} on {group.world} ranks")
        group.prepare(run.spec)
        last_run.remember(run.spec)  # for the next ComfyUI process's early start
        self._current = run.spec.key
        self._set("ready", f"{run.plan.family.upper()} on {group.world} ranks")
        run.patcher.patch_model(load_weights=False)  # object patches (e.g. model_sampling) act here

    # --- SAMPLER_SAMPLE: the conds of this run, processed ---------------------------------------------
    def sampler_sample(self, executor, guider, *args, **kwargs):
        """ComfyUI keeps conds where the text encoder left them (usually the CPU) and concatenates and
        moves them to the GPU at every step, hidden behind the model's GPU work. Routed, that work is
        not here to hide it (~5 ms a step): this run's conds (its own copies) move to the GPU once."""
        run = self.run
        if run is not None and not run.local:
            device = run.patcher.load_device
            for conds in guider.conds.values():
                for cond in conds:
                    for obj in cond.get("model_conds", {}).values():
                        value = getattr(obj, "cond", None)
                        if torch.is_tensor(value):
                            obj.cond = value.to(device)
                        elif isinstance(value, list) and all(torch.is_tensor(v) for v in value):
                            obj.cond = [v.to(device) for v in value]
        return executor(guider, *args, **kwargs)

    # --- DIFFUSION_MODEL: one model call ------------------------------------------------------------
    def diffusion_model(self, executor, *args, **kwargs):
        run = self.run
        if run is None or run.local or not self.active:
            return self._local(executor, run, args, kwargs)
        model = executor.class_obj
        call = check(run.plan, model, args, kwargs)
        try:
            if call.reason:
                raise Unroutable(call.reason)
            heads = plans.head_count(run.plan, model)
            node_of = self.group.node_of
            mesh = choose_mesh(self.group.world, args[0].shape[0], heads, self.config.parallel,
                                            "yunchang" in self.group.attention, self.group.attention == "gather",
                                            node_of)
            if spanning(mesh, node_of):  # allowed: the only split a batch of 1 leaves; said once
                self._once(("spanning", mesh), "comfy_xdit_patch: layout %s puts sequence-parallel ranks of %d "
                           "nodes in one group: its all-to-alls cross the network (a CFG > 1 or batch > 1 run "
                           "splits across nodes instead)", mesh, len(set(node_of)))
            shape = (tuple(args[0].shape), mesh)
            if not run.size:
                run.size, run.layout = pixel_size(run.patcher, args[0].shape), str(mesh)
            if shape not in self._warm:
                self._first_call(run, mesh)
            local_heads = heads if self.group.attention == "gather" else heads // mesh.ulysses
            chunks = self.tuner.choose(shape, local_heads) if mesh.ulysses > 1 and mesh.ring == 1 else 1
            t0 = time.perf_counter()
            out = self.group.call(run.spec.key, run.plan.family, mesh, chunks, call.args, call.kwargs,
                                  keep=call.static, device=args[0].device)
            seconds = time.perf_counter() - t0
        except Exception as e:
            self._failed(e, "a routed model call", run)
            return self._local(executor, run, args, kwargs)
        self.tuner.record(shape, chunks, seconds)
        self.stats["routed_calls"] += 1
        self.stats[f"layout {mesh}"] += 1
        run.routed += 1
        self.last_call = time.time()
        if shape not in self._warm:
            self._warm.add(shape)
            last_run.remember_call(run.spec, self.group.world, run.plan.family, mesh, chunks, call.args, call.kwargs)
            self._set("ready", f"{run.plan.family.upper()} on {self.group.world} ranks, {run.size}, {mesh}")
        return out

    def _first_call(self, run: Run, mesh) -> None:
        """The first call of a shape and layout on this group compiles / captures on the ranks: say so."""
        compiles = self.config.compile or (self.config.cuda_graphs and self.config.use_gpu)
        self._set("compiling" if compiles else self.state,
                  f"{'compiling' if compiles else 'first call'} for {run.size.replace('x', '×')} ({mesh})")

    def _local(self, executor, run: Run | None, args, kwargs):
        if run is not None:
            run.here += 1
            if not run.loaded_here:
                run.loaded_here = True
                comfy.model_management.load_models_gpu([run.patcher])
        self.stats["local_calls"] += 1
        return executor(*args, **kwargs)

    # --- failures ---------------------------------------------------------------------------------
    def _failed(self, e: Exception, where: str, run: Run | None = None) -> None:
        if isinstance(e, (Unroutable, LayoutError)):
            key = (id(run.patcher.model) if run else None, str(e))
            self._once(key, "comfy_xdit_patch: running this call on one GPU in ComfyUI's process: %s", e)
            if self.config.fallback == "error" and isinstance(e, LayoutError):
                raise e
            return
        self.stats["fallbacks"] += 1
        if run is not None:
            run.local = True
        if isinstance(e, ClusterUnreachable):  # no group to close, nothing broken here: a later run tries again
            self.last_fallback = {"time": time.time(), "where": where, "error": f"{type(e).__name__}: {e}"}
            if self.config.fallback == "error":
                raise e
            return
        # NOTE: what the user reads is the kind, not what surfaced first: when a rank died, a survivor's broken
        # collective (gloo's "Read error", NCCL's abort) is that death
        raw, e = e, (self.group.classify(e) if self.group is not None else classify(e))
        self.last_fallback = {"time": time.time(), "where": where, "error": f"{type(e).__name__}: {e}",
                              "raised": f"{type(raw).__name__}: {raw}"}
        transient = e.transient
        self.stats[f"failure {type(e).__name__}"] += 1
        log.warning("comfy_xdit_patch: %s failed (%s: %s); computing it on one GPU in ComfyUI's process",
                    where, type(e).__name__, e, exc_info=raw if type(e) is GroupBroken else None)
        self.close_group()
        if self.config.fallback == "error":
            raise e
        if not transient:
            self.disable(f"{type(e).__name__}: {e}")
        elif not self.life.may_restart():
            self.disable(f"{self.life.restarts} worker-group restarts; last: {type(e).__name__}: {e}")
        else:
            self._set("idle", f"restarts on the next FLUX run after: {type(e).__name__}: {e}")
            log.warning("comfy_xdit_patch: the worker group was shut down; the next sampling run starts a new one")

    def disable(self, reason: str) -> None:
        if self.disabled is None:
            self.disabled = reason
            log.error("comfy_xdit_patch: unpatched for the rest of this process: %s", reason)
            self._set("broken", reason)
            self._on_disable()

    def close_group(self) -> None:
        """Tear the group down (GroupLife.close); the status says the next run starts one."""
        if self.life.close() and self.disabled is None:
            self._set("idle", "the worker group was shut down; the next FLUX run starts one")
