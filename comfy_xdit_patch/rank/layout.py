"""How one joint sequence [txt; img] (or one stream alone, e.g. Wan's video tokens) is shared out among the
ranks of a sequence-parallel group.

Every rank gets a contiguous piece of the text tokens and a contiguous piece of the image tokens,
and all ranks hold the same number of tokens (`Shard.tokens`), so the all-to-all is even. When the total
does not divide, only the LAST rank carries `pad` filler tokens at the very end of its piece.
After the all-to-all the filler therefore sits at the end of the gathered sequence, where the
attention drops it from the keys (see attention.ulysses): the result stays exact for any size.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..errors import LayoutError


@dataclasses.dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    txt: tuple[int, int]  # [start, stop) into the text tokens
    img: tuple[int, int]  # [start, stop) into the image tokens (incl. reference tokens)
    pad: int  # filler tokens after this rank's image piece (last rank only)
    tokens: int  # tokens every rank holds, filler included
    total: int  # real tokens, txt + img

    @property
    def img_len(self) -> int:
        return self.img[1] - self.img[0]


def split(txt_total: int, img_total: int, world: int) -> list[Shard]:
    """Share txt_total text and img_total image tokens out among `world` ranks (txt_total 0: one stream)."""
    total = txt_total + img_total
    per_rank = -(-total // world)
    # NOTE: every rank needs >= 1 text and >= 1 image token: ComfyUI's blocks reshape each stream
    # with view(..., -1), which fails on an empty piece.
    if 0 < txt_total < world or img_total < world:
        raise LayoutError(f"{txt_total} text / {img_total} image tokens can't be split over {world} ranks")
    txt_sizes = [txt_total // world + (1 if r < txt_total % world else 0) for r in range(world)]
    img_sizes = [per_rank - t for t in txt_sizes[:-1]]
    img_sizes.append(img_total - sum(img_sizes))
    pad = per_rank - txt_sizes[-1] - img_sizes[-1]
    if img_sizes[-1] < 1 or pad < 0:
        raise LayoutError(f"{txt_total} text / {img_total} image tokens can't be split evenly over {world} ranks")
    shards, t0, i0 = [], 0, 0
    for r in range(world):
        shards.append(Shard(r, world, (t0, t0 + txt_sizes[r]), (i0, i0 + img_sizes[r]),
                            pad if r == world - 1 else 0, per_rank, total))
        t0, i0 = t0 + txt_sizes[r], i0 + img_sizes[r]
    return shards


def take(t: torch.Tensor, span: tuple[int, int], pad: int = 0, dim: int = 1) -> torch.Tensor:
    """t[span] along `dim`, followed by `pad` zero tokens."""
    piece = t.narrow(dim, span[0], span[1] - span[0])
    if pad == 0:
        return piece
    shape = list(piece.shape)
    shape[dim] = pad
    return torch.cat([piece, piece.new_zeros(shape)], dim=dim)


def take_prefix(t: torch.Tensor, span: tuple[int, int], length: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of a residual that covers the first t.shape[dim] image tokens, zero-filled to `length`.

    ControlNet residuals cover the output image tokens only (not reference tokens or filler);
    adding zeros elsewhere leaves those tokens exactly as they are.
    """
    stop = min(span[1], t.shape[dim])
    piece = t.narrow(dim, min(span[0], stop), max(0, stop - span[0]))
    missing = length - piece.shape[dim]
    if missing == 0:
        return piece
    shape = list(piece.shape)
    shape[dim] = missing
    return torch.cat([piece, piece.new_zeros(shape)], dim=dim)


def take_rows(rows: torch.Tensor, tokens: int, span: tuple[int, int], pad: int, repeat) -> torch.Tensor:
    """The rows of `rows` (B, R, ...) that tokens span[0]:span[1] of `tokens` use, followed by `pad` rows for
    filler; `repeat(rows, x)` is the model's own way of dealing R rows out over x's tokens (dim 1). One row
    (R == 1) serves every token and is kept as it is; the blocks' own repeat then leaves this rank's rows,
    one per token, as they are."""
    if rows.shape[1] == 1:
        return rows
    # NOTE: made on the rows' device: no host-to-device copy inside a CUDA graph capture
    rows_index = torch.arange(rows.shape[1], device=rows.device).unsqueeze(0)
    index = repeat(rows_index, rows_index.new_empty(1, tokens, 0))[0, span[0]:span[1]]
    if pad:
        index = torch.cat([index, index[-1:].expand(pad)])  # filler takes a real row: finite, and dropped
    return rows.index_select(1, index)


def gather(local: torch.Tensor, shards: list[Shard], rank: int, group, dim: int = 1) -> torch.Tensor:
    """Inverse of take() over the image stream: every rank gets all image tokens in order."""
    me = shards[rank]
    real = local.narrow(dim, 0, me.img_len)
    longest = max(s.img_len for s in shards)
    buf = take(real.contiguous(), (0, me.img_len), longest - me.img_len, dim).contiguous()
    parts = [torch.empty_like(buf) for _ in shards]
    # NOTE: collective; every rank of the group reaches it once per call, in the same order.
    dist.all_gather(parts, buf, group=group)
    return torch.cat([p.narrow(dim, 0, s.img_len) for p, s in zip(parts, shards)], dim=dim)
