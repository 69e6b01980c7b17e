"""Ulysses attention with plain torch.distributed all-to-all (any backend: gloo on CPU, NCCL on GPU).

Each rank holds `chunk` tokens of every head. One all-to-all (q, k and v fused) gives every rank the
whole sequence for heads/world of the heads; ComfyUI's own attention function runs on that; a second
all-to-all brings each token's output back to its rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _exchange(t: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty_like(t)
    # NOTE: collective over the sequence-parallel group; equal splits along dim 0 (one per rank).
    dist.all_to_all_single(out, t, group=group)
    return out


def scatter_heads(qkv: torch.Tensor, world: int, group) -> torch.Tensor:
    """(3, B, H, chunk, D) local tokens, all heads -> (3, B, H/world, world*chunk, D) all tokens, my heads."""
    n, b, h, chunk, d = qkv.shape
    send = qkv.reshape(n, b, world, h // world, chunk, d).permute(2, 0, 1, 3, 4, 5).contiguous()
    recv = _exchange(send, group)  # (world: source rank, 3, B, H/world, chunk, D)
    return recv.permute(1, 2, 3, 0, 4, 5).reshape(n, b, h // world, world * chunk, d)


def gather_heads(out: torch.Tensor, world: int, heads: int, group) -> torch.Tensor:
    """(B, world*chunk, H/world * D) my heads, all tokens -> (B, chunk, H * D) all heads, local tokens."""
    b, length, _ = out.shape
    chunk = length // world
    send = out.reshape(b, world, chunk, heads // world, -1).permute(1, 0, 2, 3, 4).contiguous()
    recv = _exchange(send, group)  # (world: head group, B, chunk, H/world, D)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, chunk, -1)


def make_override(group, world: int, total: int):
    """optimized_attention_override for ComfyUI's attention calls inside one sharded model call.

    `total` is the number of real tokens; anything past it in the gathered sequence is filler.
    """

    def override(func, q, k, v, heads, *args, skip_reshape=False, **kwargs):
        if not skip_reshape or kwargs.get("mask") is not None or heads % world:
            # NOTE: FLUX always passes (B, H, L, D) with no mask; anything else is a bug upstream of us.
            raise RuntimeError("sequence-parallel attention needs (B,H,L,D) q/k/v, no mask, heads % ranks == 0")
        full = scatter_heads(torch.stack((q, k, v)), world, group)
        q_all, k_all, v_all = full[0], full[1, :, :, :total], full[2, :, :, :total]
        out = func(q_all, k_all, v_all, heads // world, *args, skip_reshape=True, **kwargs)
        return gather_heads(out, world, heads, group)

    return override
