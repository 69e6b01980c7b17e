"""How the tensor bytes of a request or a reply travel between ComfyUI's process and rank 0.

On one host: through a shared-memory segment owned by the writer (page-locked for the GPU copies
where CUDA is there), so only a small header crosses the socket. Across hosts: as bytes on the
connection, after the header. Descriptors in headers: ("shm", name, nbytes) or ("bytes", nbytes).
"""
from __future__ import annotations

import sys
from multiprocessing import resource_tracker, shared_memory

import torch

ALIGN = 64


def layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    offsets, size = [], 0
    for t in tensors:
        offsets.append(size)
        size += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return offsets, size


def _fill(dst: torch.Tensor, tensors: list[torch.Tensor], offsets: list[int], pinned: bool) -> None:
    on_gpu = False
    for t, off in zip(tensors, offsets):
        n = t.numel() * t.element_size()
        on_gpu |= t.is_cuda
        dst[off:off + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8), non_blocking=pinned)
    if on_gpu:
        torch.cuda.current_stream().synchronize()  # the reader may look as soon as the header arrives


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
        try:
            self.seg.close()
        except BufferError:  # a caller still holds a view: the mapping goes when it does
            pass
        if unlink:
            try:
                self.seg.unlink()
            except FileNotFoundError:  # the other side removed it already
                pass


class Outbox:
    """The writing side of one direction; it owns (creates and removes) its segment."""

    def __init__(self, shared: bool):
        self.shared = shared
        self._map: _Mapping | None = None

    def stage(self, tensors: list[torch.Tensor]):
        """(offsets, descriptor, bytes to send after the header or None)."""
        offsets, size = layout(tensors)
        if not self.shared:
            pin = torch.cuda.is_available()
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            _fill(buf, tensors, offsets, pin)
            return offsets, ("bytes", size), buf
        if self._map is None or self._map.seg.size < size:
            self.close()
            self._map = _Mapping(shared_memory.SharedMemory(create=True, size=max(size, 1 << 20)))
        _fill(self._map.view[:size], tensors, offsets, self._map.pinned)
        return offsets, ("shm", self._map.seg.name, size), None

    def close(self) -> None:
        if self._map is not None:
            self._map.close(unlink=True)
            self._map = None


class Inbox:
    """The reading side of one direction. take() may return a view of shared memory that the writer
    reuses for its next message: copy what must outlive that."""

    def __init__(self, owns: bool = False):
        """owns: close() also removes the writer's segment (the driver does, for a rank that died)."""
        self._owns = owns
        self._map: _Mapping | None = None

    def take(self, conn, desc) -> torch.Tensor:
        if desc[0] == "bytes":
            buf = torch.empty(desc[1], dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            conn.recv_bytes_into(buf.numpy())
            return buf
        _, name, size = desc
        if self._map is None or self._map.seg.name != name:
            self.close()
            self._map = _Mapping(_attach(name, track=self._owns))
        return self._map.view[:size]

    def close(self) -> None:
        if self._map is not None:
            self._map.close(unlink=self._owns)
            self._map = None
