"""Measurement that the benchmark attaches to a worker group; the runtime never turns it on.

`attach(router)` adds, on each rank (Worker.attach), a RankDiagnostics that times every model call
(its wall time, the CPU time until its work was queued, and its GPU span between two CUDA events,
which costs a synchronize per call), records when requests arrive and replies leave, and serves the
bench's extra requests: `probe` (the all-to-alls of a layout alone), `profile` (torch.profiler tables
of the next two calls) and `pyprofile` (cProfile of the serving loop). On ComfyUI's side it times
each routed call and the routing checks before it. Without it, a rank's call path does no timing.
"""
from __future__ import annotations

import collections
import functools
import os
import time
from typing import NamedTuple

from ..wire.messages import Attach


class Op(NamedTuple):
    """A diagnostics request: the attached RankDiagnostics' handler `op` gets `body`."""
    op: str
    body: object


class DriverProbe:
    """ComfyUI's end of the channel, measured (DriverChannel.probe): seconds staging and sending requests,
    waiting for replies and taking them; sums of the instants a request was sent and rank 0's reply seen
    (CLOCK_MONOTONIC: on one host, comparable with the ranks'); requests by op that crossed hosts."""

    def __init__(self):
        self.timing = collections.Counter()
        self.clock = collections.Counter()
        self.crossed = collections.Counter()
        self._mark = 0.0

    def __call__(self, event: str, op: str, at: float, n: int) -> None:
        if event == "begin":
            self._mark = at
            return
        self.timing[{"sent": "send", "woke": "wait", "taken": "take"}[event]] += at - self._mark
        self._mark = at  # a reply is waited for from the request's sending, or the last reply's taking
        if event == "sent":
            self.clock[f"{op} sent"] += at
            self.crossed[op] += n
        elif event == "woke" and n == 0:
            self.clock[f"{op} woke"] += at


class RankProbe:
    """A rank's end of the channel, measured (WorkerChannel.probe): seconds from a request's arrival to its
    tensors on the device, seconds staging and sending replies, the tensor bytes that crossed, and when the
    last request arrived and the last reply was staged."""

    def __init__(self):
        self.inbound_seconds = self.reply_seconds = 0.0
        self.inbound_bytes = 0
        self.arrived = self.replying = self._reply = 0.0

    def __call__(self, event: str, op: str, at: float, n: int) -> None:
        if event == "arrived":
            self.arrived = at
            self.inbound_bytes += n
        elif event == "placed":
            self.inbound_seconds += at - self.arrived
        elif event == "reply":
            self._reply = at
        elif event == "replying":
            self.replying = at
        else:
            self.reply_seconds += at - self._reply


class LoadWatch:
    """A rank's loads that stream blocks into shards (rank/streaming.py), watched through the weights' `watch`
    hook: after each block is loaded and after it is sharded, the block bytes the model holds on the device (a
    CPU rank's device is the host: there, bytes outside mapped files, whose pages are the page cache the ranks
    of a host share) plus this rank's shards so far, and its anonymous host memory. One record per load."""

    def __init__(self, worker):
        self.w, self.loads = worker, []
        worker.weights.watch = self.seen

    @staticmethod
    def _mapped() -> list:
        """(start, end) of every file mapped into this process."""
        out = []
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/"):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi))
        return out

    def device_bytes(self, model, names: tuple) -> int:
        from ..rank.holding import block_tensors

        device = self.w.device
        mapped = self._mapped() if device.type == "cpu" else []
        seen, total = set(), 0
        for t in block_tensors(model, names):
            leaves = [getattr(t, n) for n in t.__tensor_flatten__()[0]] if hasattr(t, "__tensor_flatten__") and \
                type(t) not in (self.w.torch.Tensor, self.w.torch.nn.Parameter) else [t]
            for leaf in leaves:
                if leaf.is_meta or leaf.device != device:
                    continue
                storage = leaf.untyped_storage()
                ptr = storage.data_ptr()
                if storage.nbytes() and ptr not in seen and not any(lo <= ptr < hi for lo, hi in mapped):
                    seen.add(ptr)
                    total += storage.nbytes()
        return total

    def seen(self, event: str, model, blocks: list, names: tuple) -> None:
        from ..rank.facts import host_memory

        if event == "loaded" and not blocks:
            self.loads.append({"blocks": 0, "peak_device_bytes": 0, "peak_rss_anon": 0,
                               "rss_anon_before": host_memory().get("rss_anon", 0)})
        load = self.loads[-1]
        shards = sum(b.shard_bytes for b in blocks if not b.offloaded)
        load["blocks"] = len(blocks)
        load["peak_device_bytes"] = max(load["peak_device_bytes"], self.device_bytes(model, names) + shards)
        load["peak_rss_anon"] = max(load["peak_rss_anon"], host_memory().get("rss_anon", 0))

    def take(self) -> list:
        out, self.loads = self.loads, []
        return out


class RankDiagnostics:
    def __init__(self, worker):
        self.w = worker
        self.load_watch = LoadWatch(worker)
        self.busy = 0.0  # seconds in model calls, device work included
        self.gpu = 0.0  # the GPU's span of those calls (CUDA events)
        self.launch = 0.0  # seconds until a call's work was queued (all of it, where the CPU waits on the GPU)
        self.prelude = 0.0  # of which: before the model runs or its graph is replayed
        self.clock = collections.Counter()  # sums of instants per op: header read, reply sent
        self.profiles: list = []  # (directory, mode) for the next calls, see profile()
        self.pyprof = None
        self.marks = None  # two CUDA events, made once
        self.channel = worker.channel.probe = RankProbe()

    def handlers(self) -> dict:
        return {"call": self.call, "probe": lambda m: self.probe(m.body), "profile": lambda m: self.profile(m.body),
                "pyprofile": lambda m: self.pyprofile(m.body), "loadwatch": lambda m: self.load_watch.take()}

    def call(self, body):
        w, torch = self.w, self.w.torch
        t0 = time.perf_counter()
        profile = self.profiles.pop(0) if self.profiles else None
        captures = w.graphs.captures if w.graphs is not None else None
        run = w.runner(body, eager=profile is not None and profile[1] == "eager")
        cuda = w.device.type == "cuda"
        if cuda:
            if self.marks is None:
                self.marks = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            self.marks[0].record()
        self.prelude += time.perf_counter() - t0
        if profile is not None:
            from .profiling import profiled

            directory, mode = profile
            with profiled(os.path.join(directory, f"rank{w.rank}-{mode}"), trace=w.rank == 0):
                out = run()
        else:
            out = run()
        self.launch += time.perf_counter() - t0
        if cuda:
            self.marks[1].record()
            torch.cuda.synchronize(w.device)
            self.gpu += self.marks[0].elapsed_time(self.marks[1]) / 1e3
        self.busy += time.perf_counter() - t0
        return w.done(body, captures, out)

    def served(self, op: str) -> None:
        channel = self.channel
        self.clock[f"{op} arrived"] += channel.arrived
        self.clock[f"{op} done"] += channel.replying if channel.replying > channel.arrived else time.perf_counter()

    def stats(self, reset: bool) -> dict:
        w = self.w
        out = {"busy_seconds": self.busy, "gpu_seconds": self.gpu, "launch_seconds": self.launch,
               "launch_parts_seconds": dict(w.graphs.seconds if w.graphs else {}, prelude=self.prelude),
               "inbound_seconds": self.channel.inbound_seconds, "reply_seconds": self.channel.reply_seconds,
               "clock": dict(self.clock), "pinned": w.channel.pinned}
        if reset:
            self.busy = self.gpu = self.launch = self.prelude = 0.0
            if w.graphs:
                w.graphs.seconds.clear()
            self.channel.inbound_seconds = self.channel.reply_seconds = 0.0
            self.clock.clear()
        return out

    def probe(self, body) -> float:
        """Seconds per step of the sequence-parallel exchanges alone (attention replaced by nothing)."""
        from ..rank.layout import Shard

        w, torch = self.w, self.w.torch
        mesh, batch, tokens, heads, head_dim, blocks, chunks, reps, dtype = body
        _, make, _ = w._groups(mesh)
        shard = Shard(w.rank, mesh.sp, (0, 1), (1, tokens), 0, tokens, tokens * mesh.sp)
        override = make(shard, chunks)
        q = torch.randn(batch, heads, tokens, head_dim, device=w.device, dtype=dtype)

        def nothing(q_, k_, v_, h, *a, **k):
            return torch.empty(q_.shape[0], q_.shape[2], h * q_.shape[3], device=q_.device, dtype=q_.dtype)

        def step():
            for _ in range(blocks):
                override(nothing, q, q, q, heads, skip_reshape=True)

        step()
        run, sync = step, (lambda: None)
        if w.device.type == "cuda":  # time the GPU side, as the captured model calls run it
            sync = torch.cuda.synchronize
            sync()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run = graph.replay
            run()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        sync()
        return (time.perf_counter() - t0) / reps

    def profile(self, directory: str) -> str:
        """Profile the next two calls with torch.profiler (one eager, one as usual), tables into `directory`."""
        self.profiles = [(directory, "eager"), (directory, "graph")]
        return "armed"

    def pyprofile(self, on: bool) -> str:
        """cProfile this rank's serving loop from now (on), or stop and return its table."""
        import cProfile

        from .profiling import table

        prof, self.pyprof = self.pyprof, cProfile.Profile() if on else None
        if self.pyprof is not None:
            self.pyprof.enable()  # NOTE: profiles this thread, the serving loop, until turned off
        return "armed" if on else table(prof)


class DriverDiagnostics:
    """ComfyUI's side: seconds in routed calls and in the routing checks before them, and the bench's
    requests to the ranks. Wraps the router's DIFFUSION_MODEL wrapper and the group's call."""

    def __init__(self, router):
        self.router = router
        self.timing = collections.Counter()
        self.channel = DriverProbe()  # the current group's channel, measured
        self.group = None
        inner = router.diffusion_model

        @functools.wraps(inner)
        def diffusion_model(executor, *args, **kwargs):
            self._attach_group()
            t0 = time.perf_counter()
            calls = self.timing["calls"]
            try:
                return inner(executor, *args, **kwargs)
            finally:
                if self.timing["calls"] != calls:  # routed: the rest of the time went to checks
                    self.timing["route_seconds"] += time.perf_counter() - t0 - self._last

        router.diffusion_model = diffusion_model  # NOTE: instance attribute, read when a run registers it
        self._last = 0.0

    def _attach_group(self) -> None:
        group = self.router.group
        if group is None or group is self.group:
            return
        self.group = group
        group.channel.probe = self.channel
        group.request(Attach(RankDiagnostics), all_reply=True)
        inner = group.call

        @functools.wraps(inner)
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self._last = time.perf_counter() - t0
            self.timing["call_seconds"] += self._last
            self.timing["calls"] += 1
            return out

        group.call = call

    def ready(self):
        """The group, with the ranks' diagnostics attached."""
        self._attach_group()
        return self.group

    def exchange_seconds(self, shape: tuple, tokens: int, heads: int, blocks: int, tiny: bool = False) -> float:
        """Per-step time of the current layout's all-to-alls alone for a call on a latent of `shape` (batch first)
        with `tokens` tokens in its sequence-parallel attention, `heads` heads of 128 and `blocks` blocks (what
        the attention exchange costs)."""
        import torch

        from ..errors import LayoutError
        from ..wire.mesh import choose_mesh

        group, router = self.ready(), self.router
        batch = shape[0]
        try:
            mesh = choose_mesh(group.world, batch, heads, router.config.parallel,
                                "yunchang" in group.attention, group.attention == "gather", group.node_of)
        except LayoutError:  # this layout doesn't take this input (it ran locally)
            return float("nan")
        if mesh.sp == 1:
            return 0.0
        chunks = router.tuner.best.get((tuple(shape), mesh), 1)
        return self.probe(mesh, batch // mesh.cfg, -(-tokens // mesh.sp), heads, 128, blocks, chunks, 3,
                          torch.float32 if tiny else torch.bfloat16)

    def probe(self, mesh, batch, tokens, heads, head_dim, blocks, chunks, reps, dtype) -> float:
        """Seconds per step of the all-to-all exchanges alone, slowest rank."""
        replies = self.ready().request(Op("probe", (mesh, batch, tokens, heads, head_dim, blocks, chunks, reps, dtype)),
                                       all_reply=True)
        return max(replies.values())

    def profile(self, directory: str) -> None:
        self.ready().request(Op("profile", directory), all_reply=True)

    def pyprofile(self, on: bool) -> list[str]:
        group = self.ready()
        replies = group.request(Op("pyprofile", on), all_reply=True)
        return [replies[r] for r in range(group.world)]
