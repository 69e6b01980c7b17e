"""Sequence-parallel attention backends, chosen per worker and per call.

- `torch`: Ulysses, pipelined by head pieces, with ComfyUI's own attention function (SDPA, flash,
  sage: whatever ComfyUI was started with), over an all-to-all from attention.exchange (gloo on CPU;
  GPU peer copies or NCCL on GPU). Exact for any token count (filler keys are dropped). Needs
  heads % ulysses == 0 and ring == 1.
- `gather`: each rank keeps its queries and gathers all keys and values (attention.gather) over the
  same exchange, with ComfyUI's own attention function. Any head count; ring == 1.
- `yunchang`: yunchang's USP (Ulysses x Ring), whose ring merges blocks by log-sum-exp. Needed when
  ring > 1 (CUDA); only for token counts that divide (a ring block can't drop filler keys).
`auto` uses `torch` when ring == 1 and `yunchang` when ring > 1.
"""
from __future__ import annotations

import logging
from typing import Callable

from ...config import Mesh
from ...errors import LayoutError
from ..layout import Shard
from . import exchange as exchange_mod
from . import gather, ulysses

log = logging.getLogger(__name__)

# COMFY_XDIT_USP_KERNEL values whose ring gave the same result replayed from a CUDA graph as eagerly
# (tests/test_sharding.py::test_ring_attention_is_exact_on_cuda, 4x H100); `auto` is cuDNN on CUDA.
RING_REPLAY_SAFE = ("auto", "torch_cudnn")


def yunchang_available() -> bool:
    try:
        from . import usp  # noqa: F401
    except ImportError as e:
        log.info("yunchang unavailable (%s)", e)
        return False
    return True


def resolve(requested: str, device_type: str) -> str:
    """What this worker can do: 'torch', 'torch+yunchang' (auto, ring possible), 'gather' or 'yunchang'."""
    if requested in ("torch", "gather", "yunchang"):
        return requested
    return "torch+yunchang" if device_type == "cuda" and yunchang_available() else "torch"


def factory(backend: str, mesh: Mesh, groups, kernel: str = "auto", exchange=None) -> Callable[[Shard, int], Callable]:
    """(shard, chunks) -> optimized_attention_override for one rank's piece of one call.

    `exchange` carries the Ulysses all-to-alls or the K/V gathers (attention.exchange; default:
    torch.distributed's all-to-all)."""
    if exchange is None and mesh.sp > 1:
        exchange = exchange_mod.Collective(groups.sp)
    usp_attn = None
    if backend == "yunchang" or (mesh.ring > 1 and "yunchang" in backend):
        from . import usp

        usp_attn = usp.USPAttention(mesh, groups, kernel)

    def make(shard: Shard, chunks=1):
        if usp_attn is not None and shard.pad == 0:
            return heads_first(usp_attn.override)
        if mesh.ring > 1:
            raise LayoutError(f"{shard.total} tokens don't divide over {mesh.sp} ranks: a ring can't drop filler"
                              if usp_attn is not None else "ring > 1 needs yunchang on CUDA")
        if backend == "gather":
            return heads_first(gather.make_override(exchange, mesh.sp, shard.total, chunks))
        return heads_first(ulysses.make_override(exchange, mesh.sp, shard.total, chunks))

    return make


def heads_first(override: Callable) -> Callable:
    """The override as ComfyUI calls it from any model: FLUX hands q/k/v as (B, H, L, D) after RoPE
    (skip_reshape=True), Wan as (B, L, H*D); the backends take the first. The output is (B, L, H*D) either way."""

    def call(func, q, k, v, heads, *args, skip_reshape=False, **kwargs):
        if not skip_reshape:
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        return override(func, q, k, v, heads, *args, skip_reshape=True, **kwargs)

    return call
