"""Ulysses attention over torch.distributed all-to-all (any backend: gloo on CPU, NCCL on GPU).

Each rank holds `chunk` tokens of every head. All-to-alls of q, k and v give every rank the whole
sequence for heads/world of the heads; ComfyUI's own attention function runs on that; an all-to-all
of the output brings each token's result back to its rank.

Heads are dealt out piece-major: head (c * world + j) * h + i goes to rank j in piece c. For a batch
of one, every piece of q/k/v is then already laid out rank by rank, so nothing is copied before
sending, and the output goes back in one strided copy. With `chunks` > 1 the pieces are exchanged
asynchronously (NCCL's stream): piece c's attention runs while piece c+1 arrives and piece c-1's
output leaves. Per-head results are the same for any `chunks`.
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
        g = chunks if (heads // world) % chunks == 0 else 1
        h = heads // world // g

        def piece(t, c):  # (B, H, L, D) -> (world, B, h, L, D) for piece c; a view when B == 1
            return t.reshape(b, g, world, h, length, d)[:, c].transpose(0, 1).contiguous()

        incoming = [[_exchange(piece(t, c), group) for t in (q, k, v)] for c in range(g)]
        result = q.new_empty(b, length, g, world, h, d)
        outgoing = []
        for c, exchanges in enumerate(incoming):
            full = []
            for recv, work in exchanges:
                work.wait()
                full.append(recv.permute(1, 2, 0, 3, 4).reshape(b, h, world * length, d))
            out = func(full[0], full[1][:, :, :total], full[2][:, :, :total], h, *args, skip_reshape=True, **kwargs)
            outgoing.append(_exchange(out.reshape(b, world, length, h * d).transpose(0, 1).contiguous(), group))
        for c, (recv, work) in enumerate(outgoing):
            work.wait()
            result[:, :, c] = recv.reshape(world, b, length, h, d).permute(1, 2, 0, 3, 4)
        return result.reshape(b, length, heads * d)

    return override
