"""Ulysses attention over an all-to-all exchange (attention.exchange: NCCL / gloo, or GPU peer copies).

Each rank holds `Shard.tokens` tokens of every head. All-to-alls of q, k and v give every rank the whole
sequence for heads/world of the heads; ComfyUI's own attention function runs on that; an all-to-all
of the output brings each token's result back to its rank.

Heads are dealt out piece-major: head (c * world + j) * h + i goes to rank j in piece c. For a batch
of one, every piece of q/k/v is then already laid out rank by rank, so nothing is copied before
sending, and the output goes back in one strided copy. With `chunks` > 1 the pieces are exchanged
asynchronously: piece c's attention runs while piece c+1 arrives and piece c-1's output leaves.
Per-head results are the same for any `chunks`.
"""
from __future__ import annotations

import torch


def make_override(exchange, world: int, total: int, chunks: int = 1):
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

        exchange.begin(4 * q.numel(), q.dtype)  # q, k, v in; the output back
        incoming = [exchange.start([piece(q, c), piece(k, c), piece(v, c)]) for c in range(g)]
        result = q.new_empty(b, length, g, world, h, d)
        outgoing = []
        for wait in incoming:
            full = [torch.cat(pieces, dim=2) for pieces in wait()]  # (B, h, world * L, D), rank by rank
            out = func(full[0], full[1][:, :, :total], full[2][:, :, :total], h, *args, skip_reshape=True, **kwargs)
            outgoing.append(exchange.start([out.reshape(b, world, length, h * d).transpose(0, 1).contiguous()]))
        for c, wait in enumerate(outgoing):
            for j, back in enumerate(wait()[0]):  # (B, L, h * D) from rank j: its heads of my tokens
                result[:, :, c, j] = back.reshape(b, length, h, d)
        return result.reshape(b, length, heads * d)

    return override
