"""COMFY_XDIT_COMPILE: the ranks run their model's transformer blocks through torch.compile.

Regional compilation (torch's own recipe): each block is compiled, and every block of one class
reuses the same compiled code, so a FLUX model compiles two blocks' worth. The gain is fusion: the
norms, modulation, RoPE, activation and gated residuals around the matmuls become a few kernels
instead of dozens per block, and a call has fewer kernels to run one after another.

The sequence-parallel attention exchanges tensors between ranks, so the compiler must not see
inside it: blocks call it as one opaque op, `comfy_xdit::sp_attention`, whose implementation runs
the rank's current attention override (set per call by `routed`) eagerly, as without compile.
"""
from __future__ import annotations

import logging

import torch
from torch.utils._triton import has_triton

from .attention import heads_first

log = logging.getLogger(__name__)

_current: dict = {}  # "override": this rank's attention override for the call running now


@torch.library.custom_op("comfy_xdit::sp_attention", mutates_args=())
def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    from comfy.ldm.modules.attention import optimized_attention  # ComfyUI's choice, as FLUX calls it

    return _current["override"](optimized_attention, q, k, v, heads, skip_reshape=True)


@sp_attention.register_fake
def _(q, k, v, heads):
    b, _, length, d = q.shape
    return q.new_empty(b, length, heads * d)


def _opaque(func, q, k, v, heads, *args, skip_reshape=False, mask=None, **kwargs):
    if args or not skip_reshape or mask is not None:
        raise RuntimeError("compiled sequence-parallel attention needs (B,H,L,D) q/k/v and no mask")
    return torch.ops.comfy_xdit.sp_attention(q, k, v, heads)


_opaque_override = heads_first(_opaque)  # what the compiled blocks see as the attention override


def routed(attention):
    """`attention(shard)` -> override, as the compiled blocks need it: the override made for a call is
    reached through the opaque op. One call runs at a time on a rank."""

    def make(shard):
        _current["override"] = attention(shard)
        return _opaque_override

    return make


def compile_blocks(model, block_lists: tuple[str, ...]) -> int:
    """Compile each block of `model`'s block lists in place (once per model); returns how many."""
    if getattr(model, "_comfy_xdit_compiled", False):
        return 0
    model._comfy_xdit_compiled = True
    device = next(model.parameters()).device
    if device.type == "cuda" and not has_triton():
        log.warning("COMFY_XDIT_COMPILE: Triton is missing, so the blocks run uncompiled")
        return 0
    # NOTE: blocks of one class share compiled code; each input shape (resolution) adds an entry. A block
    # the compiler fails on runs as it is (suppress_errors), so a compile problem never fails a call.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.suppress_errors = True
    count = 0
    for name in block_lists:
        for block in getattr(model, name, ()):
            block.compile(dynamic=False)
            count += 1
    log.info("compiling %d blocks on first use", count)
    return count
