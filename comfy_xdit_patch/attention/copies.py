"""2-D copies on the GPU's copy engines: rows of contiguous elements, written at a pitch.

Ulysses needs strided destinations (one rank's tokens of every head; one rank's heads of every
token). torch copies strided tensors with SM kernels, which across GPUs would take SMs from the
attention the exchange overlaps; the CUDA driver's cuMemcpy2DAsync does it on the copy engines in
one call, and is captured into CUDA graphs like any copy. Anything it can't express falls back to
torch's copy_.
"""
from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger("comfy_xdit_patch.worker")

_DEVICE_MEMORY = 2  # CU_MEMORYTYPE_DEVICE


class _Params(ctypes.Structure):  # CUDA_MEMCPY2D
    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
                ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t),
                ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
                ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
                ("dstPitch", ctypes.c_size_t),
                ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t)]


def rows(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(rows, width, pitch) in elements when `t` is `rows` runs of `width` contiguous elements, `pitch`
    apart; None when it is not."""
    dims = [(n, st) for n, st in zip(t.shape, t.stride()) if n != 1]
    width = 1
    while dims and dims[-1][1] == width:
        width *= dims.pop()[0]
    if not dims:
        return 1, width, width
    count, pitch = dims.pop()
    while dims and dims[-1][1] == count * pitch:
        count *= dims.pop()[0]
    return None if dims or pitch < width else (count, width, pitch)


class Copy2D:
    def __init__(self):
        self._fn = None
        try:
            self._fn = ctypes.CDLL("libcuda.so.1").cuMemcpy2DAsync_v2
            self._fn.argtypes = [ctypes.POINTER(_Params), ctypes.c_void_p]
        except (OSError, AttributeError) as e:
            log.info("2-D copies fall back to torch (%s)", e)

    def __call__(self, dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """dst.copy_(src), queued on `stream` (the current one); same shape and dtype."""
        shape = rows(dst)
        if self._fn is None or shape is None or not src.is_contiguous() or dst.shape != src.shape:
            dst.copy_(src)
            return
        count, width, pitch = shape
        size = dst.element_size()
        p = _Params(srcMemoryType=_DEVICE_MEMORY, srcDevice=src.data_ptr(), srcPitch=width * size,
                    dstMemoryType=_DEVICE_MEMORY, dstDevice=dst.data_ptr(), dstPitch=pitch * size,
                    WidthInBytes=width * size, Height=count)
        err = self._fn(ctypes.byref(p), ctypes.c_void_p(stream.cuda_stream))
        if err:
            raise RuntimeError(f"cuMemcpy2DAsync failed with CUDA error {err}")
