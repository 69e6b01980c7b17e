"""Sequence-parallel attention backends, chosen per worker and per call.

- `torch`: Ulysses over torch.distributed all-to-all + ComfyUI's own attention function (SDPA, flash,
  sage: whatever ComfyUI was started with). Exact for any token count (filler keys are dropped).
  Needs heads % ulysses == 0 and ring == 1. Runs on CPU (gloo) and GPU (NCCL).
- `yunchang`: yunchang's USP (Ulysses x Ring) with torch SDPA kernels that return a usable LSE.
  CUDA only; used when the token count divides (no filler), required when ring > 1.
"""
from __future__ import annotations

import logging
from typing import Callable

from ..plans.layout import LayoutError, Mesh, Shard
from . import ulysses

log = logging.getLogger(__name__)


def resolve(requested: str, device_type: str) -> str:
    """'auto' -> 'yunchang' on CUDA when it imports, else 'torch'."""
    if requested != "auto":
        return requested
    if device_type == "cuda":
        try:
            from . import usp  # noqa: F401

            return "yunchang"
        except ImportError as e:
            log.info("yunchang unavailable (%s); using torch all-to-all attention", e)
    return "torch"


def check_mesh(mesh: Mesh, heads: int, backend: str) -> None:
    if heads % mesh.ulysses:
        raise LayoutError(f"{heads} heads don't divide over ulysses={mesh.ulysses}")
    if mesh.ring > 1 and backend != "yunchang":
        raise LayoutError("ring > 1 needs the yunchang backend (CUDA)")


def factory(backend: str, mesh: Mesh, groups, kernel: str = "auto") -> Callable[[Shard], Callable]:
    """shard -> optimized_attention_override for that rank's piece of one call."""

    def torch_override(shard: Shard):
        if mesh.ring > 1:
            raise LayoutError(f"{shard.total} tokens don't divide over {mesh.sp} ranks; ring can't drop filler")
        return ulysses.make_override(groups.sp, mesh.sp, shard.total)

    if backend != "yunchang":
        return torch_override
    from . import usp

    attn = usp.USPAttention(mesh, groups, kernel)

    def override(shard: Shard):
        return attn.override if shard.pad == 0 else torch_override(shard)

    return override
