"""The per-step path between ComfyUI's process (the driver) and the ranks, with no Ray call in it.

Ray only places and supervises the workers. Each rank holds one authenticated connection
(multiprocessing.connection) to the driver: a Unix socket on one host, TCP with TCP_NODELAY across
hosts (Nagle's algorithm with delayed ACKs would add ~40 ms to every reply). A request is a small
pickled header sent to every rank, plus ONE byte buffer with the tensors the ranks have not seen yet:
on one host a shared-memory segment that every rank copies from (see transport.py); across hosts
bytes on rank 0's connection, which rank 0 broadcasts with torch.distributed (NCCL on GPUs), so the
driver's cost does not grow with the ranks. Tensors the caller marks as repeating (the T5 context, pooled vector,
reference latents) are recognised by comparing values where they are, and cross once per sampling
run: both sides keep the same small LRU of them, which the driver orders.

Each step's costs are a few hundred microseconds of Python and torch calls on each side, so the path
keeps them few: one wait for all staged copies, views made once per layout, one pickle per header.
With GPU ranks both sides also poll instead of sleeping around the moment the other side's message is
due (the rank right after a reply, the driver from just before the reply it expects), bounded by
SPIN_MAX: waking a sleeping process and its cold core cost more than the polling.

The path measures nothing itself: each end's `probe`, None unless the bench attaches one (tools/diagnostics.py),
is called as probe(event, op, at, n) at the driver's "begin", "sent" (n: 1 if it crossed hosts), "woke", "taken"
(n: the rank replying); a rank's "arrived" (n: bytes that crossed), "placed", "reply", "replying", "replied".
"""
from __future__ import annotations

import collections
import os
import secrets
import select
import shutil
import socket
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, Callable, NamedTuple

import torch

from . import transport
from ..errors import GroupBroken, StartTimeout, StepTimeout, Unroutable, WorkerDied, WorkerFailed
from .transport import Inbox, Outbox, Views

_CACHE_SLOTS = 8
_CACHE_MIN_BYTES = 64 * 1024
SPIN_LEAD = 0.002  # seconds before a GPU group's expected reply that the driver polls without sleeping
SPIN_MAX = 0.02  # seconds a side polls without sleeping, at most, before it sleeps until woken


class TensorMeta(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # into this request's payload, or -1 when it is in a cache slot
    slot: int  # cache slot it is stored in / read from, -1 for none


def _no_delay(conn: Connection) -> None:
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        sock.close()


class DriverChannel:
    """ComfyUI's end: one connection per rank, requests in order, replies matched by sequence number."""

    def __init__(self, world: int, host: str | None = None):
        """host None: ranks on this host (Unix socket in a private directory); else TCP on host."""
        self.world = world
        self.authkey = secrets.token_bytes(32)
        self._dir = None
        if host is None:
            self._dir = tempfile.mkdtemp(prefix="comfy_xdit_")  # mode 0700
            self._listener = Listener(os.path.join(self._dir, "channel"), family="AF_UNIX", authkey=self.authkey)
        else:
            self._listener = Listener((host, 0), family="AF_INET", authkey=self.authkey)
        self.address = self._listener.address
        self._conns: list[Connection | None] = [None] * world
        self.shared = host is None  # tensor bytes through shared memory (one host)
        self._outbox = Outbox(self.shared)
        self._inboxes = [Inbox(owns=True) for _ in range(world)]  # one each: every rank writes its own
        self._seq = 0
        self._abandoned = None  # a request whose reply was not waited for (ComfyUI's interrupt)
        self._slots: collections.OrderedDict[int, torch.Tensor] = collections.OrderedDict()
        self._free = list(range(_CACHE_SLOTS))
        self._lock = threading.Lock()
        self.probe: Callable[[str, str, float, int], None] | None = None  # see the module's docstring
        self.spin_lead: float | None = None  # see _replies; None: always sleep until woken (CPU ranks)
        self._expect: dict = {}  # (op, tensor shapes) -> seconds rank 0's reply took last time
        self.waited = 0.0  # seconds rank 0's last reply took to come

    def accept(self, timeout: float, alive: Callable[[], None]) -> None:
        """Wait for every rank to connect (each first sends its rank)."""
        done = threading.Event()
        error: list[BaseException] = []

        def run():
            try:
                for _ in range(self.world):
                    conn = self._listener.accept()
                    _no_delay(conn)
                    self._conns[conn.recv()] = conn
            except BaseException as e:  # listener closed on timeout, or a bad handshake
                error.append(e)
            done.set()

        threading.Thread(target=run, name="comfy-xdit-accept", daemon=True).start()
        deadline = time.monotonic() + timeout
        while not done.wait(0.1):
            alive()
            if time.monotonic() > deadline:
                self._listener.close()
                raise StartTimeout(f"workers did not connect within {timeout:.0f}s")
        if error:
            raise GroupBroken(f"worker connection failed: {error[0]!r}")
        self._listener.close()
        self._poller = select.poll()
        for conn in self._conns:
            self._poller.register(conn.fileno(), select.POLLIN)
        self._rank_of = {conn.fileno(): rank for rank, conn in enumerate(self._conns)}

    def _store(self, t: torch.Tensor, used: set) -> int:
        """The slot t is cached in from now, or -1; never one of `used` (this request reads them)."""
        if not self._free:
            old = next((slot for slot in self._slots if slot not in used), None)
            if old is None:
                return -1
            del self._slots[old]
            self._free.append(old)
        slot = self._free.pop()
        self._slots[slot] = t.detach().clone()
        return slot

    def _stage(self, tensors: list[torch.Tensor], keep):
        """Stage the tensors the ranks don't hold. Whether a tensor to keep equals a cached one is
        computed where it is (on the GPU, as one bool each) and staged beside the payload, so that
        one wait covers both; a tensor whose values changed (a new prompt) is staged after all."""
        big = {id(t) for t in keep if t.numel() * t.element_size() >= _CACHE_MIN_BYTES}
        # (index, slot) for each tensor to keep and each cache slot that could hold its values
        checks = [(i, slot) for i, t in enumerate(tensors) if id(t) in big for slot, held in self._slots.items()
                  if held.shape == t.shape and held.dtype == t.dtype and held.device == t.device]
        checked = {i for i, _ in checks}
        sent = [i for i in range(len(tensors)) if i not in checked]
        flags = [(self._slots[slot] == tensors[i]).all() for i, slot in checks]
        offsets, desc, views, trailing = self._outbox.stage([tensors[i] for i in sent], flags)
        hits: dict[int, int] = {}
        for (i, slot), flag in zip(checks, views[len(sent):]):
            if i not in hits and bool(flag):
                hits[i] = slot
                self._slots.move_to_end(slot)
        if checked - hits.keys():
            sent = sorted(sent + list(checked - hits.keys()))
            offsets, desc, _, trailing = self._outbox.stage([tensors[i] for i in sent])
        where = dict(zip(sent, offsets))
        read = set(hits.values())
        metas = []
        for i, t in enumerate(tensors):
            if i in hits:
                metas.append(TensorMeta(tuple(t.shape), t.dtype, -1, hits[i]))
            else:
                slot = self._store(t, read) if id(t) in big else -1
                metas.append(TensorMeta(tuple(t.shape), t.dtype, where[i], slot))
        return (metas, desc, trailing) if sent else (metas, None, None)

    def request(self, op: str, body: Any = None, all_reply: bool = False, timeout: float = 60.0,
                alive: Callable[[], None] = lambda: None, interrupted: Callable[[], None] = lambda: None,
                keep: list = (), device: torch.device | None = None):
        """Send op to every rank and wait for rank 0's reply (or every rank's, with all_reply).

        Tensors of `body` that are in `keep` are cached on the ranks across requests; tensors in the
        reply are placed on `device` (default: CPU)."""
        with self._lock:
            probe = self.probe
            if probe is not None:
                probe("begin", op, time.perf_counter(), 0)
            if self._abandoned is not None:
                # NOTE: its payload must be read before the shared segment is written again
                abandoned, self._abandoned = self._abandoned, None
                self._replies(abandoned, False, timeout, alive, lambda: None, torch.device("cpu"))
            self._seq += 1
            seq = self._seq
            skeleton, tensors = transport.dumps(body)
            key = (op, all_reply, tuple(t.shape for t in tensors))
            metas, desc, trailing = self._stage(tensors, keep) if tensors else ([], None, None)
            for inbox in self._inboxes:  # a rank may write its memory again once it has this request
                inbox.settle()
            try:
                transport.send(self._conns, (seq, op, skeleton, metas, desc))
                if trailing is not None:
                    self._conns[0].send_bytes(trailing.numpy())
            except (OSError, EOFError) as e:
                raise WorkerDied(f"lost a worker while sending: {e!r}") from e
            if probe is not None:
                probe("sent", op, time.perf_counter(), 0 if self.shared else 1)
            try:
                out = self._replies(seq, all_reply, timeout, alive, interrupted, device or torch.device("cpu"),
                                    self._expect.get(key), op)
            except Unroutable:  # the replies awaited were read: nothing of this request is left to drain
                raise
            except BaseException:
                self._abandoned = seq
                raise
            if len(self._expect) > 64:
                self._expect.clear()
            self._expect[key] = self.waited
            return out

    def _replies(self, seq, all_reply, timeout, alive, interrupted, device, expect=None, op=""):
        """expect: seconds after which the reply came last time; from `spin_lead` before then, the driver
        polls without sleeping (for at most SPIN_MAX), so that it is awake and on a warm core when the
        reply comes, instead of being woken up by it."""
        deadline = time.monotonic() + timeout
        waiting = set(range(self.world)) if all_reply else {0}
        results: dict[int, Any] = {}
        probe = self.probe
        start = time.perf_counter()
        spin_from = start + expect - self.spin_lead if expect is not None and self.spin_lead is not None else None
        checked = start
        refused = None
        while waiting:
            now = time.perf_counter()
            if spin_from is not None and spin_from <= now < spin_from + SPIN_MAX:
                ready = self._poller.poll(0)
            else:
                until = spin_from - now if spin_from is not None and now < spin_from else 0.05
                ready = self._poller.poll(max(1, min(50, int(until * 1e3))))
            if not ready:
                if time.perf_counter() - checked >= 0.05:
                    checked = time.perf_counter()
                    interrupted()
                    alive()
                    if time.monotonic() > deadline:
                        raise StepTimeout(f"no reply to request {seq} within {timeout:g}s")
                continue
            for fd, _ in ready:
                rank = self._rank_of[fd]
                conn = self._conns[rank]
                t1 = time.perf_counter()
                if rank == 0:
                    self.waited = t1 - start
                if probe is not None:
                    probe("woke", op, t1, rank)
                try:
                    rseq, status, value, desc = transport.recv(conn)
                    data = self._inboxes[rank].take(conn, desc) if desc else None
                except (OSError, EOFError) as e:
                    raise WorkerDied(f"rank {rank} went away ({e!r})") from e
                if rseq != seq:
                    continue  # reply to a request the driver stopped waiting for (interrupt)
                if status == "refused":  # NOTE: the other awaited ranks' replies are read before raising
                    refused = refused or value
                    waiting.discard(rank)
                    continue
                if status == "error":
                    self._raise_if_a_rank_died()  # a peer's death surfaces as a collective error
                    raise WorkerFailed(f"rank {rank}: {value}")
                if data is not None:  # copied out: the buffer is reused for the next reply
                    skeleton, metas = value
                    views = data.get((m.offset, m.shape, m.dtype) for m in metas)
                    value = transport.loads(skeleton, self._inboxes[rank].fetch(views, device))
                results[rank] = value
                waiting.discard(rank)
                if probe is not None:
                    probe("taken", op, time.perf_counter(), rank)
        if refused is not None:
            raise Unroutable(refused)
        return results if all_reply else results[0]

    def _raise_if_a_rank_died(self) -> None:
        for rank, conn in enumerate(self._conns):
            try:
                while conn.poll(0):
                    transport.recv(conn)  # stale replies are dropped; a dead rank's connection gives EOF
            except (OSError, EOFError) as e:
                raise WorkerDied(f"rank {rank} went away ({e!r})") from e

    @property
    def pinned(self) -> tuple[bool, bool]:
        """Whether the memory requests are written to, and rank 0's replies read from, is page-locked."""
        return self._outbox.pinned, self._inboxes[0].pinned

    def close(self) -> None:
        for conn in self._conns:
            if conn is not None:
                try:
                    conn.close()
                except OSError:
                    pass
        try:
            self._listener.close()
        except OSError:
            pass
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._outbox.close()
        for inbox in self._inboxes:
            inbox.close()


class WorkerChannel:
    """A rank's end. recv() gives every rank the same (seq, op, body) with tensors on `device`."""

    def __init__(self, address, authkey: bytes, rank: int, device: torch.device, broadcast: Callable,
                 shared: bool, transient: tuple[str, ...] = ()):
        """transient: ops whose tensors nothing keeps past the request (a model call's inputs): they are
        copied into a device buffer the next request reuses, the same views at the same addresses each
        step, so nothing on the rank may compare a call's inputs with the last call's by reference.
        Other requests' tensors (a LoRA's, in `prepare`) get memory of their own."""
        self.rank = rank
        self.transient = transient
        self.device = device
        self._broadcast = broadcast  # broadcast(tensor, src=0), collective over all ranks
        self._conn = Client(address, authkey=authkey)
        _no_delay(self._conn)
        self._conn.send(rank)
        self._slots: dict[int, torch.Tensor] = {}
        self._inbox, self._outbox = Inbox(), Outbox(shared)
        self._poller = select.poll()
        self._poller.register(self._conn.fileno(), select.POLLIN)
        # seconds to poll for the next request without sleeping, once ready for it (GPU ranks only: CPU
        # ranks need every core for their own work)
        self.spin = SPIN_MAX if device.type == "cuda" else 0.0
        self._dev: Views | None = None  # the device buffer transient requests' tensors are copied into
        self.probe: Callable[[str, str, float, int], None] | None = None  # see the module's docstring

    def recv(self):
        # NOTE: during sampling the next request comes a few ms after the reply (ComfyUI's sampler step)
        end = time.perf_counter() + self.spin
        while time.perf_counter() < end and not self._poller.poll(0):
            pass
        seq, op, skeleton, metas, desc = transport.recv(self._conn)
        probe = self.probe
        if probe is not None:
            probe("arrived", op, time.perf_counter(), desc[-1] if desc else 0)
        tensors = [None] * len(metas)
        if desc:
            # One host ("shm"): every rank copies the bytes from the driver's segment itself. The driver
            # writes it again only after rank 0's reply, which no rank's work can precede: each rank's
            # copy is queued before its first collective (every request but `call` is answered by every
            # rank). Across hosts only rank 0 gets the bytes, and broadcasts them.
            # Into device memory of its own either way; for a transient op a buffer the next request
            # reuses (the model call that reads it is done by then), what the cache keeps copied out.
            shared = desc[0] == "shm"
            size = desc[-1]
            if op not in self.transient:
                into = Views(torch.empty(size, dtype=torch.uint8, device=self.device))
            else:
                if self._dev is None or self._dev.buf.numel() < size:
                    self._dev = Views(torch.empty(max(size, 1 << 20), dtype=torch.uint8, device=self.device))
                into = self._dev
            dev = into.get([(0, (size,), torch.uint8)])[0]
            if shared or self.rank == 0:
                host = self._inbox.take(self._conn, desc)
                # queued for a model call, which waits for its device before its reply; others wait here
                dev.copy_(host.get([(0, (size,), torch.uint8)])[0], non_blocking=op in self.transient)
            if not shared:
                # NOTE: collective; every rank got the same header, so every rank reaches it.
                self._broadcast(dev)
            sent = [i for i, m in enumerate(metas) if m.offset >= 0]
            for i, v in zip(sent, into.get((metas[i].offset, metas[i].shape, metas[i].dtype) for i in sent)):
                tensors[i] = v
        for i, m in enumerate(metas):
            if m.offset < 0:
                tensors[i] = self._slots[m.slot]
            elif m.slot >= 0:
                self._slots[m.slot] = tensors[i].clone()
        if probe is not None:
            probe("placed", op, time.perf_counter(), 0)
        return seq, op, transport.loads(skeleton, tensors)

    def reply(self, seq: int, value: Any) -> None:
        probe = self.probe
        if probe is not None:
            probe("reply", "", time.perf_counter(), 0)
        skeleton, tensors = transport.dumps(value)
        desc = trailing = None
        if tensors:
            offsets, desc, _, trailing = self._outbox.stage(tensors)
            value = (skeleton, [TensorMeta(tuple(t.shape), t.dtype, off, -1) for t, off in zip(tensors, offsets)])
        if probe is not None:
            probe("replying", "", time.perf_counter(), 0)
        transport.send([self._conn], (seq, "ok", value, desc))
        if trailing is not None:
            self._conn.send_bytes(trailing.numpy())
        if probe is not None:
            probe("replied", "", time.perf_counter(), 0)

    @property
    def pinned(self) -> tuple[bool, bool]:
        """Whether the memory requests are read from, and replies written to, is page-locked."""
        return self._inbox.pinned, self._outbox.pinned

    def fail(self, seq: int, message: str, status: str = "error") -> None:
        transport.send([self._conn], (seq, status, message, None))

    def close(self) -> None:
        self._conn.close()
        self._outbox.close()
        self._inbox.close()
