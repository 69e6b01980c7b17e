"""Ulysses attention over torch.distributed all-to-all (any backend: gloo on CPU, NCCL on GPU).

Each rank holds `chunk` tokens of every head. An all-to-all (q, k and v fused) gives every rank the
whole sequence for heads/world of the heads; ComfyUI's own attention function runs on that; a second
all-to-all brings each token's output back to its rank.

With `chunks` > 1 the heads are exchanged in that many pieces, all launched at once (asynchronous,
NCCL's stream), and the attention of piece c runs while piece c+1 arrives and piece c-1's output
leaves: the exchange hides behind the attention. Per-head results are the same for any `chunks`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _exchange(send: torch.Tensor, group):
    recv = torch.empty_like(send)
    # NOTE: collective over the sequence-parallel group, equal splits along dim 0 (one per rank);
    # every rank launches the same exchanges in the same order.
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    return recv, work


def make_override(group, world: int, total: int, chunks: int = 1):
    """optimized_attention_override for ComfyUI's attention calls inside one sharded model call.

    `total` is the number of real tokens; anything past it in the gathered sequence is filler.
    """

    def override(func, q, k, v, heads, *args, skip_reshape=False, **kwargs):
        if not skip_reshape or kwargs.get("mask") is not None or heads % world:
            # NOTE: FLUX always passes (B, H, L, D) with no mask; anything else is a bug upstream of us.
            raise RuntimeError("sequence-parallel attention needs (B,H,L,D) q/k/v, no mask, heads % ranks == 0")
        b, _, length, d = q.shape
        per = heads // world  # heads this rank attends
        g = chunks if per % chunks == 0 else 1
        h = per // g
        # head index = rank j * per + piece c * h + i  ->  send piece c: (world j, 3, B, h, L, D)
        qkv = torch.stack((q, k, v)).reshape(3, b, world, g, h, length, d)
        incoming = [_exchange(qkv[:, :, :, c].permute(2, 0, 1, 3, 4, 5).contiguous(), group) for c in range(g)]
        outgoing = []
        for recv, work in incoming:
            work.wait()
            full = recv.permute(1, 2, 3, 0, 4, 5).reshape(3, b, h, world * length, d)
            out = func(full[0], full[1, :, :, :total], full[2, :, :, :total], h, *args, skip_reshape=True, **kwargs)
            outgoing.append(_exchange(out.reshape(b, world, length, h, d).permute(1, 0, 2, 3, 4).contiguous(), group))
        pieces = []
        for recv, work in outgoing:
            work.wait()
            pieces.append(recv)  # (world j, B, L, h, D)
        out = torch.stack(pieces, dim=1)  # (world, g, B, L, h, D)
        return out.permute(2, 3, 0, 1, 4, 5).reshape(b, length, heads * d)

    return override
