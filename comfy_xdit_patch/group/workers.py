"""The worker group: Ray places the ranks (one placement-group bundle each) and supervises them.

Start-up: Ray (a private loopback-only cluster with no dashboard, or an existing one by address) ->
placement group -> one actor per rank -> torch.distributed rendezvous on a socket that rank 0 bound ->
each rank opens its loopback connection to the driver (channel.py) inside one long-running `serve`
call. Every wait is bounded. A dead rank shows as a closed connection or a finished `serve` call.
"""
from __future__ import annotations

import importlib
import logging
import sys
import threading
import time

from .. import errors
from ..config import Config
from ..errors import (Cancelled, ClusterShort, GroupBroken, ModelFileMissing, RayLost, RoutingError, StartTimeout,
                      WorkerDied)
from ..timing import Laps
from ..wire import channel as channel_mod
from ..wire.messages import Call, FilesAbsent, NeedPatches, Prepare, Stats
from . import lifecycle, ray_nodes
from .cluster import comfy_root, init_ray, rank_env, started_here

log = logging.getLogger(__name__)

# NOTE: the rank's class is named, not imported: this side never imports the ranks' code (torch, ComfyUI's
# model code); Ray pickles the class by reference and each rank's process imports it.
WORKER = "comfy_xdit_patch.rank.worker:Worker"


def _named(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


class WorkerGroup:
    def __init__(self, config: Config):
        self.config = config
        self.world = config.workers
        self.actors: list = []
        self.pids: list[int] = []
        self.ips: list[str] = []  # each rank's node address
        self.node_of: tuple = ()  # each rank's Ray node id
        self.serving: list = []
        self.pg = None
        self.channel: channel_mod.DriverChannel | None = None
        self.attention = None
        self.start_seconds = self.ready_at = None
        self.start_phases: dict[str, float] = {}  # seconds each start-up step took (status, first-image)
        self.cancelled = threading.Event()  # close_group() while this group is still starting
        self.private = not config.ray_address
        self._told: set[int] = set()  # pids whose log tail ComfyUI's log has shown

    def start(self) -> "WorkerGroup":
        """Start every rank; on any failure raises its kind (errors.classify), the caller shuts down."""
        try:
            return self._start()
        except Exception as e:
            if self.cancelled.is_set():
                raise Cancelled("the worker group was closed while it started") from e
            raise self.classify(e) from e

    def cancel(self) -> None:
        """From another thread: the start stops at its next check; its ranks are killed by handle now."""
        self.cancelled.set()
        self._kill_actors()

    def _start(self) -> "WorkerGroup":
        lap = Laps()
        self.start_phases = lap.seconds  # seconds each start-up step took (status, first-image)
        deadline = lap.began + self.config.start_timeout

        def left() -> float:
            if self.cancelled.is_set():
                raise Cancelled("the worker group was closed while it started")
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise StartTimeout(f"worker group did not start within {self.config.start_timeout:g}s")
            return remaining

        def get(refs):
            """ray.get in short waits: a failed rank surfaces at once (not after its peers' timeouts),
            and a cancel or the start's deadline is seen within 0.2 s."""
            single = not isinstance(refs, list)
            pending = [refs] if single else list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=min(0.2, left()))
                if done:
                    ray.get(done)  # raises the rank's error
            out = ray.get([refs] if single else refs)
            return out[0] if single else out

        init_ray(self.config)
        lap("ray")
        left()
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        Worker = _named(WORKER)

        bundle = {"CPU": 1, "GPU": 1} if self.config.use_gpu else {"CPU": 1}
        self._check_room(bundle)
        self.pg = placement_group([bundle] * self.world, strategy="PACK")
        ready = self.pg.ready()
        try:
            while not ray.wait([ready], timeout=min(0.2, left()))[0]:  # left(): a cancel or the deadline raises
                self._check_room(bundle)  # a joined cluster that lost a node: say so now, not at the timeout
        except StartTimeout as e:
            raise GroupBroken(f"Ray could not place {self.world} ranks of {bundle}: {ray.available_resources()}") from e
        # NOTE: ranks are numbered by node (bundles grouped per node, the driver's first): each node then
        # holds consecutive ranks, as every sequence-parallel group does (worker.build_groups), so with
        # the CFG split across nodes (layout.choose_mesh) no all-to-all crosses the network.
        placed = ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
        bundle_nodes = [placed[b] for b in range(self.world)]
        order = ray_nodes.rank_order(bundle_nodes, ray.get_runtime_context().get_node_id())
        lap("placement")
        self.node_of = tuple(bundle_nodes[b] for b in order)
        actor = ray.remote(Worker)
        # NOTE: a cluster this process started gave its workers rank_env() already (cluster.py), so a rank takes
        # a worker Ray started ahead; a runtime_env of its own would have Ray start a new one (+2-3 s on an H200)
        env = {} if started_here() else {"runtime_env": {"env_vars": rank_env()}}
        self.actors = [
            actor.options(num_cpus=1, num_gpus=1 if self.config.use_gpu else 0, max_restarts=0, name=None, **env,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=b))
            .remote(r, self.world, comfy_root(), self.config, asked_at=time.time())
            for r, b in enumerate(order)
        ]
        if self.cancelled.is_set():  # cancel() may have run before the actors existed
            self._kill_actors()
        host, port = get(self.actors[0].address.remote())
        self.pids, ips = zip(*get([a.where.remote() for a in self.actors]))
        self.pids, self.ips = list(self.pids), list(ips)
        lap("ranks")  # each rank's process started, with torch, ComfyUI and its GPU (rank docs: start_seconds)
        backends = get([a.init_distributed.remote(host, port, left()) for a in self.actors])
        self.attention = backends[0]
        lap("distributed")
        # NOTE: ranks on this host reach the driver over a Unix socket; others over TCP on its node address.
        here = ray.util.get_node_ip_address()
        self.channel = channel_mod.DriverChannel(self.world, host=None if set(ips) == {here} else here)
        if self.config.use_gpu:
            self.channel.spin_lead = channel_mod.SPIN_LEAD
        self.serving = [a.serve.remote(self.channel.address, self.channel.authkey, self.channel.shared)
                        for a in self.actors]
        self.channel.accept(left(), lambda: (self.check_alive(), left()))
        lap("channel")
        self.ready_at = lap.mark
        self.start_seconds = lap.mark - lap.began
        log.info("worker group ready: %d ranks on %s, %s attention, %.1fs", self.world,
                 "GPU" if self.config.use_gpu else "CPU", self.attention, self.start_seconds)
        if len(set(self.node_of)) > 1:
            log.info("comfy_xdit_patch: the ranks span %d Ray nodes: %s", len(set(self.node_of)),
                     ", ".join(f"rank {r} on {ip}" for r, ip in enumerate(self.ips)))
        return self

    def _check_room(self, bundle: dict) -> None:
        """On a joined cluster, refuse (this run only) when its alive nodes can't hold the group at all."""
        if not self.config.ray_address:
            return
        import ray

        have = ray_nodes.room(ray.nodes(), bundle)
        if have < self.world:
            raise ClusterShort(f"the Ray cluster has room for {have} of {self.world} ranks now (each FLUX run "
                               f"checks again)")

    def check_ray(self) -> None:
        """Raise RayLost once the private cluster's GCS is gone. NOTE: Ray's driver thread that polls the GCS
        for errors then spins (a core and the GIL: routed steps fell from ~30/s to ~1/s on 2 cores) until
        ray.shutdown, which the fallback runs. A dead raylet costs nothing here: the ranks serve on (channel.py),
        and the next run restarts Ray."""
        lost = lifecycle.ray_lost(self.private, kinds=("gcs_server",))
        if lost is not None:
            raise RayLost(lost)

    def check_alive(self) -> None:
        import ray

        self.check_ray()
        done, _ = ray.wait(self.serving, timeout=0, num_returns=len(self.serving))
        for ref in done:
            rank = self.serving.index(ref)
            try:
                result = ray.get(ref, timeout=0)
            except Exception as e:
                raise WorkerDied(f"rank {rank} died: {type(e).__name__}") from e
            raise WorkerDied(f"rank {rank} stopped serving ({result})")

    def dead(self, grace: float = 1.0) -> str | None:
        """Which rank's process is gone, if any, looking for up to `grace` seconds (a peer's error may
        arrive before the death is visible). Local ranks by pid, others by their serving call."""
        deadline = time.monotonic() + grace
        while True:
            gone = [r for r, pid in enumerate(self.pids) if lifecycle.process_gone(pid)]
            if gone:
                return f"rank {gone[0]} (pid {self.pids[gone[0]]}) is gone"
            if self.serving:
                try:
                    self.check_alive()
                except WorkerDied as e:
                    return str(e)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def classify(self, e: BaseException) -> RoutingError:
        """The kind of `e` (errors.classify) given what is known of this group's processes; for a death,
        ComfyUI's log gets the last lines of the dead rank's own log."""
        lost = lifecycle.ray_lost(self.private)
        if lost is not None:
            kind = errors._chain(RayLost(f"{lost} ({type(e).__name__})"), e)
        else:
            kind = errors.classify(e, None if isinstance(e, RoutingError) and e.transient else self.dead())
        if isinstance(kind, WorkerDied):
            for rank, pid in enumerate(self.pids):
                if lifecycle.process_gone(pid) and pid not in self._told:
                    self._told.add(pid)
                    tail = lifecycle.log_tail(pid)
                    log.warning("comfy_xdit_patch: rank %d (pid %d) exited; its log ends:\n%s", rank, pid,
                                tail or "(nothing: killed by a signal or the OOM killer leaves no line)")
        return kind

    def _interrupted(self) -> None:
        import comfy.model_management

        # ComfyUI's interrupt is a BaseException: it propagates past every fallback.
        comfy.model_management.throw_exception_if_processing_interrupted()

    def request(self, message, all_reply=False, timeout=None, interruptible=True, **kw):
        """Send `message` (wire/messages.py, or a diagnostics object's own with an `op`) to every rank."""
        return self.channel.request(message.op, message, all_reply=all_reply, timeout=timeout or self.config.timeout,
                                    alive=self.check_alive,
                                    interrupted=self._interrupted if interruptible else lambda: None, **kw)

    def prepare(self, spec, interruptible: bool = True) -> None:
        """Make `spec` current on every rank; its patches cross only to ranks that lack them."""
        import dataclasses

        light = dataclasses.replace(spec, patches=None) if spec.patches else spec
        kw = {"all_reply": True, "timeout": self.config.load_timeout, "interruptible": interruptible}
        replies = self.request(Prepare(light), **kw)
        if any(isinstance(v, NeedPatches) for v in replies.values()):
            replies = self.request(Prepare(spec), **kw)
        absent = {r: v for r, v in replies.items() if isinstance(v, FilesAbsent)}
        if absent:
            raise ModelFileMissing(ray_nodes.absent_message(absent))

    def call(self, key: str, family: str, mesh, chunks, args: tuple, kwargs: dict, **kw):
        """One model call on every rank (kw: request's keep, device, timeout, interruptible)."""
        self.check_ray()  # each call, not only a wait over 50 ms (check_alive): fast steps never wait that long
        return self.request(Call(key, family, mesh, chunks, args, kwargs), **kw)

    def stats(self, reset: bool = False, **kw) -> list[dict]:
        """Each rank's own view (wire.messages.Stats); kw: request's timeout, interruptible."""
        replies = self.request(Stats(reset), all_reply=True, **kw)
        return [replies[r] for r in range(self.world)]

    def _kill_actors(self) -> None:
        import ray

        for a in list(self.actors):
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass

    def shutdown(self, release_timeout: float = 30.0) -> None:
        """Idempotent; never raises. Returns once the ranks' processes are gone and Ray has released the
        placement group's bundles (each wait bounded), so that the next group can be placed at once.
        With the private cluster's own processes gone, Ray is shut down instead (the next start re-inits)."""
        if "ray" not in sys.modules:
            return
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        lost = lifecycle.ray_lost(self.private)
        if lost is not None:
            self.actors, self.pg = [], None
            log.warning("comfy_xdit_patch: %s", lost)
            lifecycle.restart_ray()
            return
        self._kill_actors()
        self.actors = []
        deadline = time.monotonic() + release_timeout
        while any(not lifecycle.process_gone(p) for p in self.pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pg is not None:
            pg, self.pg = self.pg, None
            try:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(pg)
                released = lifecycle.wait_released(pg.id.hex(), max(1.0, deadline - time.monotonic()))
            except Exception as e:
                released = f"{type(e).__name__}: {e}"
            if released is not True:  # its GPUs stay reserved: a later group may not be placed
                log.warning("comfy_xdit_patch: Ray has not released the group's placement (%s)", released or "timeout")
