"""K/V all-gather attention: each rank keeps its own queries and gathers every rank's keys and values.

The other way to split one attention over a sequence-parallel group (the all-gather context
parallelism of Llama 3's training). Against Ulysses (attention.ulysses):
- nothing comes back after the attention: a rank's output is already its own tokens, all heads, so
  the exchange has no tail to wait for and the output needs no reassembly;
- q is not sent; k and v go whole to every peer: a rank receives 2(N-1)/N of one full-sequence
  tensor where Ulysses receives 4(N-1)/N² (q, k, v in, the output back): the same at 2 ranks, twice
  as much at 4;
- any head count works (no heads % ranks).
With several pieces (`chunks`: ulysses.head_pieces) the heads are gathered piece by piece: piece c's
attention runs while piece c+1 arrives. Each query still sees every key once, in the same order as one GPU: filler keys (the last
rank's padding, at the very end of the gathered sequence) are dropped, so the result is exact.
"""
from __future__ import annotations

import torch

from .ulysses import head_pieces


def make_override(exchange, world: int, total: int, chunks=1):
    """optimized_attention_override for ComfyUI's attention calls inside one sharded model call."""

    def override(func, q, k, v, heads, *args, skip_reshape=False, **kwargs):
        if not skip_reshape or kwargs.get("mask") is not None:
            # NOTE: FLUX always passes (B, H, L, D) with no mask; anything else is a bug upstream of us.
            raise RuntimeError("sequence-parallel attention needs (B,H,L,D) q/k/v and no mask")
        sizes = head_pieces(heads, chunks)
        spans = [(sum(sizes[:c]), sum(sizes[:c + 1])) for c in range(len(sizes))]

        def piece(t, c):  # heads of piece c, the same for every peer: (world, B, h, L, D), a view
            part = t[:, spans[c][0]:spans[c][1]].contiguous()
            return part.expand(world, *part.shape)

        exchange.begin(2 * world * k.numel(), k.dtype)  # k and v, one copy per peer slot
        incoming = [exchange.start([piece(k, c), piece(v, c)]) for c in range(len(sizes))]
        outs = []
        for (s, e), wait in zip(spans, incoming):
            keys, values = (torch.cat(pieces, dim=2)[:, :, :total] for pieces in wait())  # rank by rank
            outs.append(func(q[:, s:e], keys, values, e - s, *args, skip_reshape=True, **kwargs))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, L, heads * D), head-major like one GPU

    return override
