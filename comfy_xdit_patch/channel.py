"""The per-step path between ComfyUI's process (the driver) and the ranks, with no Ray call in it.

Ray only places and supervises the workers. Each rank holds one authenticated connection
(multiprocessing.connection) to the driver: a Unix socket on one host, TCP with TCP_NODELAY across
hosts (Nagle's algorithm with delayed ACKs would add ~40 ms to every reply). A request is a small
pickled header sent to every rank, plus ONE byte buffer with the tensors the ranks have not seen yet:
on one host a shared-memory segment that every rank copies from (see transport.py); across hosts
bytes on rank 0's connection, which rank 0 broadcasts with torch.distributed (NCCL on GPUs), so the
driver's cost does not grow with the ranks. Tensors the caller marks as repeating (the T5 context, pooled vector,
reference latents) are recognised with torch.equal and cross once per sampling run: both sides keep
the same small LRU of them, which the driver orders.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import secrets
import shutil
import socket
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, Listener, wait
from typing import Any, Callable

import torch

from .errors import GroupBroken, StepTimeout, Unroutable, WorkerDied, WorkerFailed
from .transport import Inbox, Outbox

_CACHE_SLOTS = 8
_CACHE_MIN_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # into this request's payload, or -1 when it is in a cache slot
    slot: int  # cache slot it is stored in / read from, -1 for none


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class _Pickler(pickle.Pickler):
    """Pickles anything (model specs, LoRA adapters, call arguments) with its tensors taken out."""

    def __init__(self, file, tensors: list):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = tensors

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            self.tensors.append(obj)
            return len(self.tensors) - 1
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, tensors: list):
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid):
        return self.tensors[pid]


def _dumps(obj) -> tuple[bytes, list]:
    tensors: list[torch.Tensor] = []
    buf = io.BytesIO()
    _Pickler(buf, tensors).dump(obj)
    return buf.getvalue(), tensors


def _loads(data: bytes, tensors: list):
    return _Unpickler(io.BytesIO(data), tensors).load()


def _unpack(buf: torch.Tensor, metas: list[TensorMeta]) -> list[torch.Tensor | None]:
    out = []
    for m in metas:
        if m.offset < 0:
            out.append(None)
            continue
        n = _nbytes(m.shape, m.dtype)
        out.append(buf[m.offset:m.offset + n].view(m.dtype).reshape(m.shape))
    return out


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
        self._outbox, self._inbox = Outbox(self.shared), Inbox(owns=True)
        self._seq = 0
        self._abandoned = None  # a request whose reply was not waited for (ComfyUI's interrupt)
        self._slots: collections.OrderedDict[int, torch.Tensor] = collections.OrderedDict()
        self._free = list(range(_CACHE_SLOTS))
        self._lock = threading.Lock()
        self.timing = collections.Counter()  # seconds: staging+sending requests, waiting, taking replies

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
                raise StepTimeout(f"workers did not connect within {timeout:.0f}s")
        if error:
            raise GroupBroken(f"worker connection failed: {error[0]!r}")
        self._listener.close()

    def _cached(self, t: torch.Tensor) -> int:
        for slot, held in self._slots.items():
            if held.shape == t.shape and held.dtype == t.dtype and held.device == t.device and torch.equal(held, t):
                self._slots.move_to_end(slot)
                return slot
        return -1

    def _store(self, t: torch.Tensor) -> int:
        if not self._free:
            old, _ = self._slots.popitem(last=False)
            self._free.append(old)
        slot = self._free.pop()
        self._slots[slot] = t.detach().clone()
        return slot

    def request(self, op: str, body: Any = None, all_reply: bool = False, timeout: float = 60.0,
                alive: Callable[[], None] = lambda: None, interrupted: Callable[[], None] = lambda: None,
                keep: list = (), device: torch.device | None = None):
        """Send op to every rank and wait for rank 0's reply (or every rank's, with all_reply).

        Tensors of `body` that are in `keep` are cached on the ranks across requests; tensors in the
        reply are placed on `device` (default: CPU)."""
        with self._lock:
            t0 = time.perf_counter()
            if self._abandoned is not None:
                # NOTE: its payload must be read before the shared segment is written again
                abandoned, self._abandoned = self._abandoned, None
                self._replies(abandoned, False, timeout, alive, lambda: None, torch.device("cpu"))
            self._seq += 1
            seq = self._seq
            skeleton, tensors = _dumps(body)
            metas, new = [], []
            cacheable = {id(t) for t in keep if t.numel() * t.element_size() >= _CACHE_MIN_BYTES}
            for t in tensors:
                slot = self._cached(t) if id(t) in cacheable else -1
                if slot >= 0:
                    metas.append(TensorMeta(tuple(t.shape), t.dtype, -1, slot))
                    continue
                store = self._store(t) if id(t) in cacheable else -1
                metas.append(TensorMeta(tuple(t.shape), t.dtype, 0, store))
                new.append(t)
            offsets, desc, trailing = self._outbox.stage(new) if new else ([], None, None)
            it = iter(offsets)
            metas = [dataclasses.replace(m, offset=next(it)) if m.offset == 0 else m for m in metas]
            header = (seq, op, skeleton, metas, desc)
            try:
                for conn in self._conns:
                    conn.send(header)
                if trailing is not None:
                    self._conns[0].send_bytes(trailing.numpy())
            except (OSError, EOFError) as e:
                raise WorkerDied(f"lost a worker while sending: {e!r}") from e
            self.timing["send"] += time.perf_counter() - t0
            try:
                return self._replies(seq, all_reply, timeout, alive, interrupted, device or torch.device("cpu"))
            except BaseException:
                self._abandoned = seq
                raise

    def _replies(self, seq, all_reply, timeout, alive, interrupted, device):
        deadline = time.monotonic() + timeout
        waiting = set(range(self.world)) if all_reply else {0}
        results: dict[int, Any] = {}
        by_conn = {id(c): r for r, c in enumerate(self._conns)}
        t0 = time.perf_counter()
        while waiting:
            ready = wait(self._conns, timeout=0.05)
            if not ready:
                interrupted()
                alive()
                if time.monotonic() > deadline:
                    raise StepTimeout(f"no reply to request {seq} within {timeout:.0f}s")
                continue
            for conn in ready:
                rank = by_conn[id(conn)]
                t1 = time.perf_counter()
                self.timing["wait"] += t1 - t0
                try:
                    rseq, status, value, desc = conn.recv()
                    data = self._inbox.take(conn, desc) if desc else None
                except (OSError, EOFError) as e:
                    raise WorkerDied(f"rank {rank} went away ({e!r})") from e
                if rseq != seq:
                    continue  # reply to a request the driver stopped waiting for (interrupt)
                if status == "refused":
                    raise Unroutable(value)
                if status == "error":
                    self._raise_if_a_rank_died()  # a peer's death surfaces as a collective error
                    raise WorkerFailed(f"rank {rank}: {value}")
                if data is not None:  # copied out: the buffer is reused for the next reply
                    skeleton, metas = value
                    value = _loads(skeleton, [t.to(device, copy=True) for t in _unpack(data, metas)])
                results[rank] = value
                waiting.discard(rank)
                t0 = time.perf_counter()
                self.timing["take"] += t0 - t1
        return results if all_reply else results[0]

    def _raise_if_a_rank_died(self) -> None:
        for rank, conn in enumerate(self._conns):
            try:
                while conn.poll(0):
                    conn.recv()  # stale replies are dropped; a dead rank's connection gives EOF
            except (OSError, EOFError) as e:
                raise WorkerDied(f"rank {rank} went away ({e!r})") from e

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
        self._inbox.close()


class WorkerChannel:
    """A rank's end. recv() gives every rank the same (seq, op, body) with tensors on `device`."""

    def __init__(self, address, authkey: bytes, rank: int, device: torch.device, broadcast: Callable,
                 shared: bool):
        self.rank = rank
        self.device = device
        self._broadcast = broadcast  # broadcast(tensor, src=0), collective over all ranks
        self._conn = Client(address, authkey=authkey)
        _no_delay(self._conn)
        self._conn.send(rank)
        self._slots: dict[int, torch.Tensor] = {}
        self._inbox, self._outbox = Inbox(), Outbox(shared)
        self.inbound_seconds = 0.0  # from a header's arrival to its tensors being on the device
        self.reply_seconds = 0.0  # staging and sending replies

    def recv(self):
        seq, op, skeleton, metas, desc = self._conn.recv()
        t0 = time.perf_counter()
        buf = None
        if desc:
            # One host ("shm"): every rank copies the bytes from the driver's segment itself. The driver
            # writes it again only after rank 0's reply, which no rank's work can precede: each rank's
            # copy is queued before its first collective (every request but `call` is answered by every
            # rank). Across hosts only rank 0 gets the bytes, and broadcasts them.
            # A copy of its own either way: the driver reuses its buffer for the next request.
            shared = desc[0] == "shm"
            if shared or self.rank == 0:
                buf = self._inbox.take(self._conn, desc).to(self.device, copy=True, non_blocking=True)
            else:
                buf = torch.empty(desc[-1], dtype=torch.uint8, device=self.device)
            if not shared:
                # NOTE: collective; every rank got the same header, so every rank reaches it.
                self._broadcast(buf)
        tensors = _unpack(buf, metas) if buf is not None else [None] * len(metas)
        for i, m in enumerate(metas):
            if m.offset < 0:
                tensors[i] = self._slots[m.slot]
            elif m.slot >= 0:
                self._slots[m.slot] = tensors[i]
        self.inbound_seconds += time.perf_counter() - t0
        return seq, op, _loads(skeleton, tensors)

    def reply(self, seq: int, value: Any) -> None:
        t0 = time.perf_counter()
        skeleton, tensors = _dumps(value)
        if not tensors:
            self._conn.send((seq, "ok", value, None))
            return
        offsets, desc, trailing = self._outbox.stage(tensors)
        metas = [TensorMeta(tuple(t.shape), t.dtype, off, -1) for t, off in zip(tensors, offsets)]
        self._conn.send((seq, "ok", (skeleton, metas), desc))
        if trailing is not None:
            self._conn.send_bytes(trailing.numpy())
        self.reply_seconds += time.perf_counter() - t0

    def fail(self, seq: int, message: str, status: str = "error") -> None:
        self._conn.send((seq, status, message, None))

    def close(self) -> None:
        self._conn.close()
        self._outbox.close()
        self._inbox.close()
