"""One rank of the worker group: a Ray actor that holds the model and serves model calls.

The actor builds the model itself with ComfyUI's own loader, from the recipe ComfyUI recorded when it
loaded the model (`ModelPatcher.cached_patcher_init`: loader + path + options), or by running again the
loader node that made a model without one (rank/models.py), so weights never go through Ray. LoRA weight patches and diffusion-model object patches are replayed on a clone and put
on the device by `comfy.model_management.load_models_gpu`, as in ComfyUI itself.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import socket
import sys
import time
import traceback

from ..wire.messages import Attach, Call, FilesAbsent, NeedPatches, Prepare, Ready, Stats
from . import heap

log = logging.getLogger("comfy_xdit_patch.worker")


@dataclasses.dataclass
class Groups:
    sp: object
    cfg: object
    ulysses: object
    ring: object


def build_groups(mesh, rank: int) -> Groups:
    import torch.distributed as dist

    mine = {}

    def make(kind, ranks):
        # NOTE: collective; every rank creates every group, in the same order.
        g = dist.new_group(ranks)
        if rank in ranks:
            mine[kind] = g

    for c in range(mesh.cfg):
        make("sp", list(range(c * mesh.sp, (c + 1) * mesh.sp)))
    for s in range(mesh.sp):
        make("cfg", [c * mesh.sp + s for c in range(mesh.cfg)])
    for c in range(mesh.cfg):
        base = c * mesh.sp
        for r in range(mesh.ring):  # ulysses ranks are consecutive, ring ranks strided
            make("ulysses", [base + r * mesh.ulysses + u for u in range(mesh.ulysses)])
        for u in range(mesh.ulysses):
            make("ring", [base + r * mesh.ulysses + u for r in range(mesh.ring)])
    return Groups(**mine)


def _ray_gpu_index() -> int:
    """This actor's GPU as a torch index. Ray leaves CUDA_VISIBLE_DEVICES as the raylet had it (every
    GPU of the group visible, see group/workers.py), so the id Ray assigned is looked up in that list."""
    import ray

    gpu = str(ray.get_gpu_ids()[0])
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible.index(gpu) if gpu in visible else int(gpu)  # else: Ray numbered the visible ones


class Worker:
    def __init__(self, rank: int, world: int, comfy_root: str, config, asked_at: float | None = None):
        from ..timing import Laps

        lap = Laps(clock=time.time)  # wall clock: `asked_at` is ComfyUI's process's
        heap.fix_mmap_threshold()
        # how this rank's start-up went (rank docs): its process's start (Ray), then its imports and GPU
        self.start_seconds = lap.seconds
        self.start_seconds["process"] = round(lap.began - asked_at, 3) if asked_at else None

        if comfy_root not in sys.path:
            sys.path.insert(0, comfy_root)
        logging.basicConfig(level=logging.INFO, format=f"[comfy_xdit rank {rank}] %(message)s")
        import comfy.options  # noqa: F401  (argument parsing stays off: defaults)
        from comfy.cli_args import args

        if not config.use_gpu:
            args.cpu = True
        import torch

        lap("torch")
        # NOTE: Ray starts an actor of num_cpus=1 with OMP_NUM_THREADS=1, so torch's CPU work (reading the
        # weights file into the model: 24 GB for FLUX.1-dev) ran on one thread, 31 s on 2x H200 against 6 s
        # in ComfyUI's process. Each rank takes its share of the node's cores (every GPU is visible).
        sharers = world if not config.use_gpu else max(1, torch.cuda.device_count())
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // sharers))
        if config.use_gpu:
            torch.cuda.set_device(_ray_gpu_index())  # before ComfyUI picks its device: the current one
            lap("cuda")
        self.cache_folder = None  # where compiled code is kept (compile_cache), sealed after each new shape
        self.sealed: set = set()
        if config.compile:
            from . import compile_cache

            self.cache_folder = compile_cache.use(config.cache_dir,
                                                  torch.cuda.get_device_name() if config.use_gpu else "cpu")
        import comfy.model_management as mm

        self.torch, self.mm = torch, mm
        self.rank, self.world = rank, world
        self.config = config
        self.device = mm.get_torch_device()
        if config.gpu_cap is not None:  # COMFY_XDIT_GPU_CAP: this rank's GPU as a smaller card (ComfyUI told so too)
            from .facts import cap_memory

            cap_memory(torch, mm, self.device, config.gpu_cap)
        from .holding import RankWeights

        self.weights = RankWeights(config.shard_weights, rank, world, self.device)  # COMFY_XDIT_SHARD_WEIGHTS
        lap("comfyui")
        self.graphs = None
        if config.cuda_graphs and self.device.type == "cuda":
            from .graphs import CallGraphs

            self.graphs = CallGraphs()
        self.attention = None
        self._store_socket = None
        self.bases: collections.OrderedDict[str, object] = collections.OrderedDict()
        self.loaded: dict[str, object] = {}  # spec key -> patched clone on the device
        self.current = None  # spec key last made current
        self.channel = None
        self.meshes: dict = {}
        self.counters = collections.Counter()
        self.last_call = None  # wall-clock time of the last model call
        self.load_seconds = 0.0
        from .vae import Decodes

        self.decodes = Decodes(rank, world, self.device)  # the VAE decodes shared out by rows (rank/vae.py)
        self.handlers = {"prepare": self.prepare, "call": self.call, "stats": self.stats, "attach": self.attach,
                         "decode": self.decode}
        self.diagnostics = None  # see attach()

    # --- start-up (Ray calls) ----------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """(node ip, port of a listening socket for the rendezvous store). Called on rank 0 only."""
        import ray

        host = ray.util.get_node_ip_address()
        # NOTE: the store listens on this pre-bound socket, so on a private cluster it is loopback only.
        self._store_socket = socket.create_server((host, 0))
        return host, self._store_socket.getsockname()[1]

    def _on_device(self) -> None:
        """The current CUDA device is per thread; Ray may run a method on another thread than __init__."""
        if self.device.type == "cuda":
            self.torch.cuda.set_device(self.device)

    def init_distributed(self, host: str, port: int, timeout_s: float) -> str:
        import torch.distributed as dist

        self._on_device()

        if host.startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        timeout = datetime.timedelta(seconds=timeout_s)
        listen = {"master_listen_fd": self._store_socket.fileno()} if self.rank == 0 else {}
        store = dist.TCPStore(host, port, self.world, self.rank == 0, timeout=timeout, **listen)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        kw = {"device_id": self.device} if backend == "nccl" else {}
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world, timeout=timeout, **kw)
        from . import attention

        self.attention = attention.resolve(self.config.attention, self.device.type)
        return self.attention

    def where(self) -> tuple[int, str]:
        import ray

        return os.getpid(), ray.util.get_node_ip_address()

    # --- the serving loop (one long-running Ray call) ----------------------------------------------
    def serve(self, address, authkey: bytes, shared: bool) -> str:
        import torch.distributed as dist

        from ..errors import LayoutError, Unroutable
        from ..wire.channel import WorkerChannel

        self._on_device()
        channel = self.channel = WorkerChannel(address, authkey, self.rank, self.device,
                                               lambda t: dist.broadcast(t, src=0), shared, transient=("call",))
        while True:
            try:
                seq, op, body = channel.recv()
            except (EOFError, OSError):  # the driver closed the group (or went away)
                channel.close()
                return "closed"
            try:
                with self.torch.inference_mode():
                    result = self.handlers[op](body)
                if result is not None:
                    channel.reply(seq, result)
                if self.diagnostics is not None:
                    self.diagnostics.served(op)
            except (LayoutError, Unroutable) as e:  # refused before any collective (a model: maybe by one rank)
                channel.fail(seq, str(e), status="refused")
            except Exception as e:  # reported to the driver, which decides what happens to the group
                log.error("request %s (%s) failed:\n%s", seq, op, traceback.format_exc())
                channel.fail(seq, f"{type(e).__name__}: {e}")

    # --- requests ---------------------------------------------------------------------------------
    def stats(self, message: Stats) -> dict:
        """What this rank holds and has done (read on demand: the status endpoint, tests, the bench)."""
        reset = message.reset
        cuda = self.device.type == "cuda"
        out = {"rank": self.rank, "pid": os.getpid(), "device": str(self.device), "attention": self.attention,
               "exchange": sorted(k[9:] for k in self.counters if k.startswith("exchange ")),
               "calls": self.counters["calls"], "last_call": self.last_call,
               "graph_replays": self.graphs.replays if self.graphs else 0,
               "loads": self.counters["loads"], "compiled_blocks": self.counters["compiled blocks"],
               "decodes": self.decodes.count, "load_seconds": self.load_seconds, "start_seconds": self.start_seconds, "models": list(self.bases),
               "weights": self.weights.stats(reset)}
        from .facts import device_facts

        out.update(device_facts(self.torch, self.device))  # host, GPU name, memory now and peak
        if self.diagnostics is not None:
            out.update(self.diagnostics.stats(reset))
        if reset:
            self.counters["calls"] = 0
            if cuda:
                self.torch.cuda.reset_peak_memory_stats(self.device)
        return out

    def attach(self, message: Attach) -> str:
        """Attach a diagnostics object made by `factory(worker)` (the bench's, by reference): its handlers
        join this rank's, and it may wrap `call`. Never attached by default."""
        self.diagnostics = message.factory(self)
        self.handlers.update(self.diagnostics.handlers())
        return "attached"

    def _base(self, spec):
        if spec.base_key in self.bases:
            self.bases.move_to_end(spec.base_key)
            return self.bases[spec.base_key]
        while len(self.bases) >= self.config.model_cache:
            self._drop(next(iter(self.bases)))
        from .models import build

        with self.weights.building():  # where it may be sharded: its blocks stay in the file for now
            patcher = build(spec)
        self.counters["loads"] += 1
        self.bases[spec.base_key] = patcher
        return patcher

    def _drop(self, base_key: str) -> None:
        """Unload a base model and its patched clones (the cache's oldest, or a sharded one another spec wants)."""
        old = self.bases.pop(base_key)
        for key in [k for k, p in self.loaded.items() if p.model is old.model]:
            del self.loaded[key]
        self.current = self.current if self.current in self.loaded else None
        self.weights.forget(old.model.diffusion_model)
        self.mm.unload_model_and_clones(old)
        log.info("evicted %s", base_key)

    def prepare(self, message: Prepare) -> Ready | NeedPatches | FilesAbsent:
        """Make the model of the spec (base + patches) current on the device."""
        spec = message.spec
        t0 = time.perf_counter()
        for model in self.weights.stale(spec.key):  # sharded for another spec: built again from its files
            self._drop(next(k for k, p in self.bases.items() if p.model.diffusion_model is model))
        if spec.key not in self.loaded:
            if spec.base_key not in self.bases:
                from .models import missing_files

                absent = missing_files(spec)
                # NOTE: prepare has no collective, so ranks that refuse here while others load can't hang them
                if absent:  # a clear refusal (group.prepare names node and path), not a loader traceback
                    return FilesAbsent(self.where()[1], absent)
            if spec.patches is None:  # sent without its patches, which this rank doesn't hold
                return NeedPatches()
            if spec.base_key not in self.bases:  # before loading: the files are the ones ComfyUI read
                from .models import check_files

                check_files(spec.files, self.rank)
            base = self._base(spec)
            clone = base.clone()
            clone.patches = {k: list(v) for k, v in (spec.patches or {}).items()}
            clone.patches_uuid = spec.patches_uuid
            for name, obj in spec.object_patches.items():
                clone.add_object_patch(name, obj)
            clone.force_cast_weights = spec.force_cast_weights
            self.loaded = {k: p for k, p in self.loaded.items() if p.model is not base.model}
            self.loaded[spec.key] = clone
        changed, self.current = spec.key != self.current, spec.key
        if self.graphs is not None and changed:
            self.graphs.clear()  # NOTE: captured graphs point at the weights as they were
        from .. import plans

        patcher = self.loaded[spec.key]
        plan = plans.plan_for(patcher.model.diffusion_model)
        blocks = plan.blocks if plan else ()
        whole = self.weights.before_load(spec.key, patcher, blocks)  # streams blocks into shards where wanted
        self.mm.load_models_gpu([patcher], force_full_load=whole)  # else ComfyUI's partial loading of the rest
        self.weights.after_load(spec.key, patcher, blocks)  # shards it where wanted (local)
        if changed:
            heap.settle()
        self.load_seconds = time.perf_counter() - t0
        return Ready()

    def decode(self, message):
        out = self.decodes(message, self.loaded.get(self.current), self.weights.sharded(self.current or ""))
        if self.decodes.moved:  # NOTE: captured graphs point at the weights the VAE's load moved: the next
            self.current = None  # prepare loads the model again, as a changed one, and forgets them
        return out

    def _kernel_preference(self):
        """Torch SDPA kernel order for this call (COMFY_XDIT_SDPA); ComfyUI's own choice by default."""
        if self.config.sdpa == "comfyui" or self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}[self.config.sdpa]
        order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                       SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH) if b != first]
        return sdpa_kernel(order, set_priority=True)

    def _groups(self, mesh):
        from . import attention

        if mesh not in self.meshes:
            groups = build_groups(mesh, self.rank)
            exchange = None
            if mesh.sp > 1 and mesh.ring == 1:
                exchange = attention.exchange.make(groups.sp, self.device, self.config.exchange)
                self.counters[f"exchange {exchange.kind}"] += 1
            make = attention.factory(self.attention, mesh, groups, self.config.usp_kernel, exchange)
            self.meshes[mesh] = (groups, make, exchange)
        return self.meshes[mesh]

    def runner(self, body: Call, eager: bool = False):
        """The model call of `body`, ready to run: a function of no arguments that returns the output."""
        from . import attention as attention_mod
        from .. import plans
        from . import sharding

        key, family, mesh, chunks, args, kwargs = body
        model = self.loaded[key].model.diffusion_model
        plan = plans.by_family(family)
        groups, make, _ = self._groups(mesh)
        attention = functools.partial(make, chunks=chunks)
        # NOTE: ComfyUI's partial loading casts weights per call, which compiled and graphed blocks ran 2.3x slower
        # than ComfyUI alone (1x H200, FLUX.2 capped at 24 GiB: waiting on the CPU): such a model runs as in ComfyUI
        partial = getattr(self.loaded[key].model, "model_lowvram", False)
        if self.config.compile and not self.weights.sharded(key) and not partial:  # sharded: uncompiled (their hooks)
            from . import compiled

            self.counters["compiled blocks"] += compiled.compile_blocks(model, plan.blocks)
            attention = compiled.routed(attention)

        def run(inputs):
            with self._kernel_preference(), self.weights.call(key):
                # contiguous (FLUX's output is a permuted view): rank 0's reply is then one plain copy
                return sharding.shard(plan, model, inputs[0], inputs[1], mesh, self.rank, groups, attention).contiguous()

        # NOTE: yunchang's ring replayed from a CUDA graph matched its eager run only with the cuDNN kernel
        # (4x H100); other kernels run the ring eagerly.
        eager = eager or (mesh.ring > 1 and self.config.usp_kernel not in attention_mod.RING_REPLAY_SAFE)
        eager = eager or partial or self.weights.sharded(key)  # NOTE: gathers in a graph: not yet tried on GPUs
        if self.graphs is not None and not eager:
            return functools.partial(self.graphs.run, (key, mesh, chunks), run, (args, kwargs))
        return functools.partial(run, (args, kwargs))

    def call(self, body: Call, eager: bool = False):
        mark = self.graphs.captures if self.graphs is not None else None
        self.weights.settle()  # NOTE: under auto on GPUs, a collective at the first call after a prepare
        return self.done(body, mark, self.runner(body, eager)())

    def done(self, body, mark, out):
        """After a model call: count it, settle the heap after a new graph (`mark`: captures before the call),
        seal the compile cache after a new input shape or layout (its code was compiled and ran)."""
        self.counters["calls"] += 1
        self.last_call = time.time()
        if mark is not None and self.graphs.captures != mark:  # a new graph: the shape's objects are made
            heap.settle()
        if self.cache_folder is not None:
            shape = (body.mesh, tuple(body.args[0].shape))
            if shape not in self.sealed:
                from . import compile_cache

                self.sealed.add(shape)
                compile_cache.seal(self.cache_folder)
        return out if self.rank == 0 else None
