"""Ulysses attention over an all-to-all exchange (attention.exchange: NCCL / gloo, or GPU peer copies).

Each rank holds `chunk` tokens of every head. All-to-alls of q, k and v give every rank the whole
sequence for heads/world of the heads; ComfyUI's own attention function runs on that; an all-to-all
of the output brings each token's result back to its rank.

Heads are dealt out piece-major: head (c * world + j) * h + i goes to rank j in piece c. For a batch
of one, every piece of q/k/v is then already laid out rank by rank, so nothing is copied before
sending. Each piece lands where it is used (exchange slots): q/k/v as (B, h, world, L, D), i.e.
every rank's tokens of each head in rank order, which attention reads as it is; the output as this
rank's tokens of the source rank's heads in the result. With `chunks` > 1 the pieces are exchanged
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

        def by_rank(place, src):  # (B, h, world, L, D): the source rank's tokens of every head
            return place[:, :, src]

        exchange.begin(4 * q.numel(), q)  # q, k, v in; the output back
        incoming = []
        for c in range(g):
            places = [exchange.alloc((b, h, world, length, d)) for _ in range(3)]
            incoming.append((places, exchange.start([piece(q, c), piece(k, c), piece(v, c)],
                                                    [(p, by_rank) for p in places])))
        result = exchange.alloc((b, length, g, world, h * d))
        outgoing = []
        for c, (places, wait) in enumerate(incoming):
            wait()
            full = [p.view(b, h, world * length, d) for p in places]  # every rank's tokens, in rank order
            out = func(full[0], full[1][:, :, :total], full[2][:, :, :total], h, *args, skip_reshape=True, **kwargs)
            send = out.reshape(b, world, length, h * d).transpose(0, 1).contiguous()  # a view when B == 1

            def by_head(place, src, c=c):  # (B, L, g, world, h * D): the source rank's heads of piece c
                return place[:, :, c, src]

            outgoing.append(exchange.start([send], [(result, by_head)]))
        for wait in outgoing:
            wait()
        # NOTE: with peer copies `result` lives in the exchange buffer until this rank's next attention
        # call; the model uses it before then (FLUX: the next op).
        return result.view(b, length, heads * d)

    return override
