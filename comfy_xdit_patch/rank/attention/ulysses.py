"""Ulysses attention over an all-to-all exchange (attention.exchange: NCCL / gloo, or GPU peer copies).

Each rank holds `Shard.tokens` tokens of every head. All-to-alls of q, k and v give every rank the whole
sequence for heads/world of the heads; ComfyUI's own attention function runs on that; an all-to-all
of the output brings each token's result back to its rank.

The heads are exchanged in pieces (`chunks`, see head_pieces), asynchronously: piece c's attention runs
while piece c+1 arrives and piece c-1's output leaves, so only the first piece's arrival and the last
one's departure are not hidden. A tapered schedule, small pieces first and last, shrinks those two.
Heads are dealt out piece-major: of piece c (heads from s_c * world, h_c per rank), head
(s_c * world + j * h_c + i) goes to rank j. For a batch of one, every piece of q/k/v is then already
laid out rank by rank, so nothing is copied before sending, and the output goes back in one strided
copy. Per-head results are the same for any schedule.
"""
from __future__ import annotations

import torch


def head_pieces(count: int, chunks) -> tuple[int, ...]:
    """Heads per piece: `chunks` equal pieces (an int), or the schedule itself (a tuple of head counts,
    e.g. (1, 2, 1): tapered); one piece where the heads don't divide or the schedule doesn't add up."""
    if isinstance(chunks, int):
        return (count // chunks,) * chunks if chunks > 0 and count % chunks == 0 else (count,)
    pieces = tuple(int(n) for n in chunks)
    return pieces if pieces and min(pieces) > 0 and sum(pieces) == count else (count,)


def make_override(exchange, world: int, total: int, chunks=1):
    """optimized_attention_override for ComfyUI's attention calls inside one sharded model call.

    `total` is the number of real tokens; anything past it in the gathered sequence is filler.
    """

    def override(func, q, k, v, heads, *args, skip_reshape=False, **kwargs):
        if not skip_reshape or kwargs.get("mask") is not None or heads % world:
            # NOTE: FLUX always passes (B, H, L, D) with no mask; anything else is a bug upstream of us.
            raise RuntimeError("sequence-parallel attention needs (B,H,L,D) q/k/v, no mask, heads % ranks == 0")
        b, _, length, d = q.shape
        sizes = head_pieces(heads // world, chunks)
        starts = [sum(sizes[:c]) * world for c in range(len(sizes))]

        def piece(t, c):  # (B, H, L, D) -> (world, B, h_c, L, D) for piece c; a view when B == 1
            s, h = starts[c], sizes[c]
            return t[:, s:s + world * h].reshape(b, world, h, length, d).transpose(0, 1).contiguous()

        exchange.begin(4 * q.numel(), q.dtype)  # q, k, v in; the output back
        incoming = [exchange.start([piece(q, c), piece(k, c), piece(v, c)]) for c in range(len(sizes))]
        result = q.new_empty(b, length, heads, d)
        outgoing = []
        for h, wait in zip(sizes, incoming):
            full = [torch.cat(pieces, dim=2) for pieces in wait()]  # (B, h, world * L, D), rank by rank
            out = func(full[0], full[1][:, :, :total], full[2][:, :, :total], h, *args, skip_reshape=True, **kwargs)
            outgoing.append(exchange.start([out.reshape(b, world, length, h * d).transpose(0, 1).contiguous()]))
        for s, h, wait in zip(starts, sizes, outgoing):
            # (B, L, h_c * D) from rank j: its heads of my tokens, which sit side by side in head order
            result[:, :, s:s + world * h] = torch.stack(wait()[0], dim=2).reshape(b, length, world * h, d)
        return result.reshape(b, length, heads * d)

    return override
