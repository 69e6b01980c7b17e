"""A VAE decode shared out among the ranks by rows (patch parallelism), exact for any height.

The latent's rows (its height) are split among the ranks of a group, each rank as many as the next or one more;
a video's time axis stays whole on every rank. Each rank runs ComfyUI's own decoder on its rows, with three
kinds of its modules made aware of the split for that one decode (`row_parallel`, which puts everything back):

- A convolution whose kernel spans rows (3x3) first receives `p` rows (its padding) from each neighbour, one
  point-to-point exchange per side, runs as ComfyUI's module on the widened rows, and drops the `p` output rows
  on each side that had a neighbour: what remains is exactly the whole image's convolution on this rank's rows
  (the image's own edges keep the module's padding, whatever its mode). Wan's causal 3D convolutions widen the
  time cache they are handed together with their input.
- GroupNorm takes its statistics over the whole image: one all-reduce of each group's sum and element count
  gives the mean, a second of the squared deviations from it the variance (two passes, in fp64).
- An attention block's keys and values are gathered from every rank (all-gather); each rank's queries
  attend the whole image (Wan's: each frame whole).

The rest of these decoders is per position and needs nothing: nearest upsampling (every rank's rows double),
Wan's RMS norm (over channels), activations, 1x1 convolutions, Wan 2.2's DupUp3D. `check` refuses a decoder
with any other kind of module, and `Decodes` has every rank agree before the first collective of a decode.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import Unroutable
from ..wire.mesh import shares

log = logging.getLogger("comfy_xdit_patch.worker")


@dataclasses.dataclass(frozen=True)
class Rows:
    """The latent's rows by rank (`counts[r]` for rank r of `group`, in order) and this rank."""
    counts: tuple[int, ...]
    rank: int
    group: object = None  # a torch.distributed group; None: the default one

    @property
    def world(self) -> int:
        return len(self.counts)

    def take(self, latent: torch.Tensor) -> torch.Tensor:
        return latent.narrow(-2, sum(self.counts[:self.rank]), self.counts[self.rank])

    def peer(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def now(self, rows: int) -> list[int]:
        """Every rank's rows at a layer where this one has `rows`: upsampling scales them all alike."""
        scale, left = divmod(rows, self.counts[self.rank])
        if left:
            raise RuntimeError(f"{rows} rows are no multiple of this rank's {self.counts[self.rank]} latent rows")
        return [n * scale for n in self.counts]


def split_rows(height: int, world: int) -> tuple[int, ...]:
    """`height` latent rows shared out among `world` ranks, in order; the first ones take one more."""
    if height < world:
        raise Unroutable(f"a latent {height} rows high can't be decoded by rows on {world} ranks")
    return shares(height, world)


def widen(rows: Rows, x: torch.Tensor, p: int) -> tuple[torch.Tensor, int]:
    """x (rows at dim -2) with its neighbours' `p` nearest rows added on their side; the rows added above."""
    # NOTE: point-to-point, every rank with each neighbour it has, at the same convolution of the same decode;
    # every rank holds >= p rows (split_rows: >= 1 latent row; the decoders' kernels are 3 high).
    ops, above, below = [], None, None
    shape = list(x.shape)
    shape[-2] = p
    if rows.rank > 0:
        above = x.new_empty(shape)
        ops += [dist.P2POp(dist.isend, x[..., :p, :].contiguous(), rows.peer(rows.rank - 1), rows.group),
                dist.P2POp(dist.irecv, above, rows.peer(rows.rank - 1), rows.group)]
    if rows.rank < rows.world - 1:
        below = x.new_empty(shape)
        ops += [dist.P2POp(dist.isend, x[..., -p:, :].contiguous(), rows.peer(rows.rank + 1), rows.group),
                dist.P2POp(dist.irecv, below, rows.peer(rows.rank + 1), rows.group)]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return torch.cat([t for t in (above, x, below) if t is not None], dim=-2), p if above is not None else 0


def _padded(rows: Rows, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """x padded to the most rows any rank holds (the collectives take equal shapes), and every rank's rows."""
    counts = rows.now(x.shape[-2])
    most = max(counts)
    if x.shape[-2] < most:  # NOTE: the shorter shares are padded, then cut after the collective
        x = torch.cat([x, x.new_zeros(x.shape[:-2] + (most - x.shape[-2], x.shape[-1]))], dim=-2)
    return x.contiguous(), counts


def _joined(parts: list, counts: list[int]) -> torch.Tensor:
    return torch.cat([part.narrow(-2, 0, n) for part, n in zip(parts, counts)], dim=-2)


def gather_rows(rows: Rows, x: torch.Tensor) -> torch.Tensor:
    """Every rank's x, joined by rows in rank order, on every rank."""
    x, counts = _padded(rows, x)
    parts = [torch.empty_like(x) for _ in counts]
    dist.all_gather(parts, x, group=rows.group)
    return _joined(parts, counts)


def gather_first(rows: Rows, x: torch.Tensor) -> torch.Tensor | None:
    """Every rank's x joined by rows on the group's first rank (None on the others)."""
    x, counts = _padded(rows, x)
    parts = [torch.empty_like(x) for _ in counts] if rows.rank == 0 else None
    dist.gather(x, parts, dst=rows.peer(0), group=rows.group)
    return _joined(parts, counts) if rows.rank == 0 else None


# --- the modules' behaviour for one decode ---------------------------------------------------------------
def _conv(rows: Rows, p: int, forward, x, *args, **kwargs):
    wide, above = widen(rows, x, p)
    return forward(wide, *args, **kwargs).narrow(-2, above, x.shape[-2])


def _causal_conv(rows: Rows, p: int, forward, x, cache_x=None, cache_list=None, cache_idx=None):
    """Wan's CausalConv3d: the time cache it is handed holds the last frames of this rank's rows only (its
    caller keeps them from the unwidened input), so the cache is widened together with the input."""
    if cache_list is not None:
        cache_x, cache_list[cache_idx] = cache_list[cache_idx], None
    if torch.is_tensor(cache_x):
        frames = cache_x.shape[2]
        wide, above = widen(rows, torch.cat([cache_x.to(x.device), x], dim=2), p)
        cache_x, wide = wide[:, :, :frames], wide[:, :, frames:]
    else:
        wide, above = widen(rows, x, p)
    return forward(wide, cache_x).narrow(-2, above, x.shape[-2])


def _group_norm(rows: Rows, module, x):
    import comfy.ops

    b, c = x.shape[:2]
    groups = x.reshape(b, module.num_groups, -1).float()
    sums = torch.cat([groups.sum(-1, dtype=torch.float64).flatten(),
                      torch.tensor([groups.shape[-1]], dtype=torch.float64, device=x.device)])
    dist.all_reduce(sums, group=rows.group)  # NOTE: every rank, every GroupNorm call, in the decoder's order
    count = sums[-1]
    centred = groups - (sums[:-1] / count).view(b, -1, 1).float()
    squares = centred.square().sum(-1, dtype=torch.float64)
    dist.all_reduce(squares, group=rows.group)
    y = (centred * torch.rsqrt(squares / count + module.eps).float().unsqueeze(-1)).view(x.shape)
    if module.affine:
        shape = (1, c) + (1,) * (x.ndim - 2)
        if isinstance(module, comfy.ops.CastWeightBiasOp):  # ComfyUI's own cast (offloaded or cast weights)
            weight, bias, stream = comfy.ops.cast_bias_weight(module, y, offloadable=True)
            y = y * weight.view(shape) + bias.view(shape)
            comfy.ops.uncast_bias_weight(module, weight, bias, stream)
        else:
            y = y * module.weight.to(y).view(shape) + module.bias.to(y).view(shape)
    return y.to(x.dtype)


def _attention(rows: Rows, q, k, v):
    """ComfyUI's VAE attention (one head; each image's, or frame's, positions; channels as features) with
    the keys and values of every rank's rows: both gathered in one all-gather."""
    shape, c = q.shape, q.shape[1]
    kv = gather_rows(rows, torch.cat([k, v], dim=1))
    q, k, v = (t.reshape(t.shape[0], 1, c, -1).transpose(2, 3) for t in (q, kv[:, :c], kv[:, c:]))
    return F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(shape)


_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)


def _halo(name: str, conv) -> int:
    """Rows a convolution needs from each neighbour (its padding); refused unless it keeps its input's rows."""
    k, padding = conv.kernel_size[-2], conv.padding
    p = None if isinstance(padding, str) else padding[-2]
    if p is None or conv.stride[-2] != 1 or conv.dilation[-2] != 1 or 2 * p != k - 1:
        raise Unroutable(f"the VAE decoder's {name} ({type(conv).__name__}, kernel {conv.kernel_size}, stride "
                         f"{conv.stride}, padding {padding}) does not keep its input's rows")
    return p


def _swaps(model) -> list[tuple[object, str, object]]:
    """(module, attribute, behaviour for this decode) for every module of `model`'s decoder that needs one;
    Unroutable for a VAE or a module the row split does not know."""
    from comfy.ldm.modules.diffusionmodules.model import Upsample
    from comfy.ldm.wan.vae import CausalConv3d, RMS_norm
    from comfy.ldm.wan.vae2_2 import DupUp3D

    from ..plans.vae import vae_kind

    if vae_kind(model) is None:
        raise Unroutable(f"a {type(model).__name__} VAE is not one the ranks decode by rows")
    local = (torch.nn.SiLU, torch.nn.Dropout, torch.nn.Identity, Upsample, DupUp3D)  # per position
    swaps = []
    for name, m in model.decoder.named_modules():
        if "optimized_attention" in m.__dict__:  # ComfyUI's VAE attention blocks (FLUX's AttnBlock, Wan's)
            swaps.append((m, "optimized_attention", lambda rows, m=m: functools.partial(_attention, rows)))
        elif next(m.children(), None) is not None or isinstance(m, _CONTAINERS) or type(m) is torch.nn.Module:
            continue  # a block: its own code is ComfyUI's decoder, which does nothing across rows but this
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            p = _halo(name, m)
            if p:
                fn = _causal_conv if isinstance(m, CausalConv3d) else _conv
                swaps.append((m, "forward", lambda rows, m=m, fn=fn, p=p: functools.partial(fn, rows, p, m.forward)))
        elif isinstance(m, torch.nn.GroupNorm):
            swaps.append((m, "forward", lambda rows, m=m: functools.partial(_group_norm, rows, m)))
        elif isinstance(m, torch.nn.Upsample):
            factors = m.scale_factor if isinstance(m.scale_factor, tuple) else (m.scale_factor,)
            if m.mode not in ("nearest", "nearest-exact") or any(f != int(f) for f in factors):
                raise Unroutable(f"the VAE decoder's {name} upsamples by {m.scale_factor} ({m.mode})")
        elif isinstance(m, RMS_norm):
            if not m.channel_first:
                raise Unroutable(f"the VAE decoder's {name} normalises over its last axis, not its channels")
        elif not isinstance(m, local):
            raise Unroutable(f"the VAE decoder's {name} is a {type(m).__name__}, which a split by rows does not know")
    return swaps


def check(model) -> None:
    """Unroutable unless `model` (ComfyUI's first-stage model) can be decoded by rows."""
    _swaps(model)


_UNSET = object()


@contextlib.contextmanager
def row_parallel(model, rows: Rows):
    """For the block: `model`'s decoder decodes this rank's rows of a latent (the whole image's output for those
    rows). Its modules' behaviour is set on the instances and put back as it was, whatever happens."""
    saved = []
    try:
        for module, attr, make in _swaps(model):
            saved.append((module, attr, module.__dict__.get(attr, _UNSET)))
            object.__setattr__(module, attr, make(rows))
        yield
    finally:
        for module, attr, old in reversed(saved):
            if old is _UNSET:
                object.__delattr__(module, attr)
            else:
                object.__setattr__(module, attr, old)


def decode(model, latent: torch.Tensor, rows: Rows) -> torch.Tensor | None:
    """`model.decode` of the whole `latent` (on every rank), each rank decoding its rows: the group's first
    rank gets the decoded image (channels first, as the model returns it), the others None. One latent of
    the batch at a time (ComfyUI's own decode fits as many as memory allows; the same number on every rank
    would need their memory to agree)."""
    part = rows.take(latent)
    with row_parallel(model, rows):
        out = torch.cat([model.decode(part[i:i + 1]) for i in range(part.shape[0])])
    return gather_first(rows, out)


class Decodes:
    """A rank's side of the Decode request: the VAE built from its spec (ComfyUI's loader, as models are; the
    last one kept), loaded by ComfyUI, then its share of the decode."""

    def __init__(self, rank: int, world: int, device):
        self.rank, self.world, self.device = rank, world, device
        self.vaes: collections.OrderedDict = collections.OrderedDict()  # spec key -> the VAE's patcher
        self.count = 0  # decodes this rank took part in
        self.moved = False  # the last decode's load moved weights of the diffusion model held current

    def _ready(self, message):
        import comfy.model_management as mm

        from .models import build, check_files, missing_files

        spec = message.spec
        if spec.key not in self.vaes:
            absent = missing_files(spec)
            if absent:
                raise Unroutable(f"rank {self.rank} has no {', '.join(absent)}")
            check_files(spec.files, self.rank)
            self.vaes.clear()  # one VAE at a time: a few hundred MB, beside the diffusion model
            self.vaes[spec.key] = build(spec)
        patcher = self.vaes[spec.key]
        check(patcher.model)
        mm.load_models_gpu([patcher], memory_required=message.memory, force_full_load=True)
        return patcher.model

    def __call__(self, message, held=None, sharded: bool = False) -> torch.Tensor | None:
        """`held`: the patcher of the diffusion model this rank holds current (or None), whose weights the VAE's
        load may move off the device to make room, as ComfyUI's own decode would (`moved` says so after);
        `sharded`: its weights are shared by the ranks (rank/weights.py), which ComfyUI can't move: refused."""
        before = held.loaded_size() if held is not None else None
        try:
            return self._decode(message, "the diffusion model's weights are sharded" if sharded else None)
        finally:
            self.moved = held is not None and held.loaded_size() != before

    def _decode(self, message, problem):
        latent, model = message.latent, None
        try:
            rows = Rows(split_rows(latent.shape[-2], self.world), self.rank)
            model = None if problem else self._ready(message)
        except Exception as e:
            problem = str(e) if isinstance(e, Unroutable) else f"rank {self.rank}: {type(e).__name__}: {e}"
        # NOTE: every rank reaches this one collective whatever it found, and all refuse together: a rank that
        # can't decode must not leave the others waiting in the decode's exchanges.
        problems = [None] * self.world
        dist.all_gather_object(problems, problem)
        refused = next((p for p in problems if p), None)
        if refused is not None:
            raise Unroutable(refused)
        dtype = next(model.decoder.parameters()).dtype
        out = decode(model, latent.to(self.device, dtype), rows)
        self.count += 1
        return out
