"""How a request or a reply travels between ComfyUI's process and the ranks.

A header is a pickled object with its tensors taken out (dumps / loads), one pickle for every
connection (send / recv). The tensors' bytes go on one host through a shared-memory segment owned by
the writer (page-locked for the GPU copies where CUDA is there), so only the small header crosses the
socket; across hosts as bytes on the connection, after the header. Descriptors in headers:
("shm", name, nbytes) or ("bytes", nbytes).
"""
from __future__ import annotations

import io
import math
import pickle
import sys
from multiprocessing import resource_tracker, shared_memory

import torch

ALIGN = 64


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


def dumps(obj) -> tuple[bytes, list]:
    """(skeleton, tensors); a bare tensor (a model call's output) has an empty skeleton."""
    if isinstance(obj, torch.Tensor):
        return b"", [obj]
    tensors: list[torch.Tensor] = []
    buf = io.BytesIO()
    _Pickler(buf, tensors).dump(obj)
    return buf.getvalue(), tensors


def loads(data: bytes, tensors: list):
    if not data:
        return tensors[0]
    return _Unpickler(io.BytesIO(data), tensors).load()


def send(conns, obj) -> None:
    """One pickle for every connection (Connection.send would pickle again for each)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    for conn in conns:
        conn.send_bytes(data)


def recv(conn):
    return pickle.loads(conn.recv_bytes())


def layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    offsets, size = [], 0
    for t in tensors:
        offsets.append(size)
        size += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return offsets, size


def typed(buf: torch.Tensor, offset: int, shape, dtype) -> torch.Tensor:
    """The bytes of buf at offset, seen as a tensor of shape and dtype (offsets are ALIGNed)."""
    n = math.prod(shape) * dtype.itemsize
    return buf[offset:offset + n].view(dtype).view(shape)


class Views:
    """Typed views into one buffer, made once per layout: a sampling run sends the same shapes at every
    step, and each view costs a few torch calls."""

    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self._made: dict = {}

    def get(self, metas) -> list[torch.Tensor]:
        """metas: (offset, shape, dtype) each."""
        key = tuple(metas)
        views = self._made.get(key)
        if views is None:
            if len(self._made) >= 32:
                self._made.clear()
            views = self._made[key] = [typed(self.buf, off, shape, dtype) for off, shape, dtype in key]
        return views


def _one_wait(gpus: list, pinned: bool) -> list[bool]:
    """non_blocking for each copy, given the GPU each touches (or None): between a GPU and page-locked
    memory every copy is queued but the last one that touches a GPU, which waits for its stream, so
    every copy is done when the last returns (one wait, and no Python stream objects)."""
    used = [i for i, g in enumerate(gpus) if g is not None]
    queue = pinned and len({gpus[i] for i in used}) == 1  # else every copy waits on its own
    return [queue and i != used[-1] for i in range(len(gpus))]


def _gpu(t: torch.Tensor):
    return t.device if t.is_cuda else None


def copy_all(pairs, pinned: bool) -> None:
    """dst.copy_(src) for each pair; all done on return (the readers may look as soon as a header arrives)."""
    flags = _one_wait([_gpu(src) or _gpu(dst) for dst, src in pairs], pinned)
    for (dst, src), queued in zip(pairs, flags):
        dst.copy_(src, non_blocking=queued)


def _pin(view: torch.Tensor) -> bool:
    if not torch.cuda.is_available():
        return False
    return torch.cuda.cudart().cudaHostRegister(view.data_ptr(), view.numel(), 0) == 0


def _unpin(view: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(view.data_ptr())


def _attach(name: str, track: bool) -> shared_memory.SharedMemory:
    """track: this process may unlink the segment (then its resource tracker must know of it)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=track)
    seg = shared_memory.SharedMemory(name=name)
    if not track:
        # NOTE: before 3.13 an attaching process registers the segment too, and its tracker would
        # unlink it at exit; only the writer, who created it, owns it.
        resource_tracker.unregister(seg._name, "shared_memory")
    return seg


class _Mapping:
    """A shared-memory segment mapped here as a uint8 tensor (page-locked when CUDA is there)."""

    def __init__(self, seg: shared_memory.SharedMemory):
        self.seg = seg
        self.view = torch.frombuffer(seg.buf, dtype=torch.uint8)
        self.pinned = _pin(self.view)

    def close(self, unlink: bool) -> None:
        if self.pinned:
            _unpin(self.view)
        self.view = None
        # NOTE: views made from `view` (Views) don't keep the mapping: their owners drop them first
        try:
            self.seg.close()
        except BufferError:
            pass
        if unlink:
            try:
                self.seg.unlink()
            except FileNotFoundError:  # the other side removed it already, before our tracker heard of that
                # NOTE: else the tracker would warn of a leaked segment at this process's exit
                resource_tracker.unregister(self.seg._name, "shared_memory")


class Outbox:
    """The writing side of one direction; it owns (creates and removes) its segment, or, across hosts,
    a page-locked buffer whose bytes follow the header."""

    def __init__(self, shared: bool):
        self.shared = shared
        self._map: _Mapping | None = None
        self._buf: torch.Tensor | None = None  # across hosts
        self._plans: dict = {}  # (count, shapes and dtypes) -> offsets, sizes, views
        self.pinned = False  # the memory staged into is page-locked

    def _room(self, total: int) -> None:
        have = self._map.seg.size if self._map is not None else self._buf.numel() if self._buf is not None else 0
        if have >= total:
            return
        self.close()
        size = max(total, 1 << 20)
        if self.shared:
            self._map = _Mapping(shared_memory.SharedMemory(create=True, size=size))
            self.pinned = self._map.pinned
        else:
            self.pinned = torch.cuda.is_available()
            self._buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)

    def stage(self, tensors: list[torch.Tensor], extra: list[torch.Tensor] = ()):
        """Copy tensors (then `extra`, which the writer reads back itself and the reader never sees) in.
        Returns (offsets of tensors + extra, descriptor, views of what was staged, bytes to send after
        the header or None)."""
        staged = list(tensors) + list(extra)
        key = (len(tensors),) + tuple((t.shape, t.dtype) for t in staged)
        plan = self._plans.get(key)
        if plan is None:
            offsets, total = layout(staged)
            size = offsets[len(tensors)] if extra else total
            self._room(total)
            buf = self._map.view if self.shared else self._buf
            views = Views(buf).get((off, t.shape, t.dtype) for off, t in zip(offsets, staged))
            if len(self._plans) >= 32:
                self._plans.clear()
            plan = self._plans[key] = (offsets, size, views, None if self.shared else buf[:size])
        offsets, size, views, trailing = plan
        copy_all([(v, t.detach() if t.requires_grad else t) for v, t in zip(views, staged)], self.pinned)
        desc = ("shm", self._map.seg.name, size) if self.shared else ("bytes", size)
        return offsets, desc, views, trailing

    def close(self) -> None:
        self._plans.clear()
        self._buf = None
        self.pinned = False
        if self._map is not None:
            self._map.close(unlink=True)
            self._map = None


class Inbox:
    """The reading side of one direction. take() returns memory that the writer reuses for its next
    message (shared memory, or a buffer of this side's across hosts): copy what must outlive that."""

    def __init__(self, owns: bool = False):
        """owns: close() also removes the writer's segment (the driver does, for a rank that died)."""
        self._owns = owns
        self._map: _Mapping | None = None
        self._buf: torch.Tensor | None = None  # across hosts
        self._views: Views | None = None
        self.pinned = False  # page-locked
        self._pending = None  # CUDA event after copies out of the writer's memory that may still run
        self._events: dict = {}  # device -> its event

    def take(self, conn, desc) -> Views:
        """The message's bytes, as typed views (see Views.get)."""
        if desc[0] == "bytes":
            size = desc[1]
            if self._buf is None or self._buf.numel() < size:
                self.pinned = torch.cuda.is_available()
                self._buf = torch.empty(max(size, 1 << 20), dtype=torch.uint8, pin_memory=self.pinned)
                self._views = Views(self._buf)
            conn.recv_bytes_into(self._buf.numpy())
            return self._views
        _, name, size = desc
        if self._map is None or self._map.seg.name != name:
            self.close()
            self._map = _Mapping(_attach(name, track=self._owns))
            self.pinned = self._map.pinned
            self._views = Views(self._map.view)
        return self._views

    def fetch(self, views: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """Copies of views (from take) on device. To a GPU from page-locked memory they are queued on the
        current stream, like the caller's next work on them; settle() waits for them."""
        if device.type != "cuda" or not self.pinned:
            return [v.to(device, copy=True) for v in views]
        out = [v.to(device, copy=True, non_blocking=True) for v in views]
        if device not in self._events:  # an event belongs to the device it was first recorded on
            self._events[device] = torch.cuda.Event()
        self._pending = self._events[device]
        self._pending.record(torch.cuda.current_stream(device))  # where the copies were queued
        return out

    def settle(self) -> None:
        """Wait until nothing is copied out of the writer's memory any more (before it may write again)."""
        if self._pending is not None:
            self._pending.synchronize()

    def close(self) -> None:
        self.settle()
        self._buf = self._views = self._pending = None
        if self._map is not None:
            self._map.close(unlink=self._owns)
            self._map = None
