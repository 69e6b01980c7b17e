"""Weights shared by the ranks (COMFY_XDIT_SHARD_WEIGHTS): each rank keeps 1/N of the bytes of every transformer
block of its model; a block's full weights exist on a rank only while that block computes, and the next block's
are gathered meanwhile. Inference only: no gradients, so one all-gather per block is the whole protocol.

A model is sharded as it loads where the rank knows beforehand (rank/streaming.py: its blocks go from the file
into the shards one by one, with their LoRA patches), else as ComfyUI left it after `load_models_gpu` (LoRA already
in the weights; `auto`'s agreement, `settle`). Each tensor of a
block is taken apart into plain tensors: a tensor subclass with `__tensor_flatten__` (ComfyUI's QuantizedTensor:
fp8 data + scale) into its inner tensors, one that keeps its bytes in its own storage (ComfyUI-GGUF's
GGMLTensor: quantized blocks) as those bytes, its Python attributes (GGUF's type, shape, LoRA patches) kept
aside. A block's plain tensors are packed as bytes, and rank r keeps the r-th contiguous 1/N of them. Any dtype
crosses as uint8 (fp8, GGUF blocks, scales): the collective never sees a dtype it may not support (gloo has no
float8, NCCL only recent ones). A gathered block is rebuilt as views into the gathered bytes.

Collective order (NOTE): every rank of the group, whatever its CFG group or sequence piece, runs every block of
every routed call in the model's order (the plan's block lists: FLUX's double then single blocks), and each
block's pre-hook gathers that block (if not yet in flight) and starts the next one's gather, over the whole
world (the default group: the channel's broadcast uses it only between calls, never while a call runs). So all
ranks issue the same gathers in the same order, interleaved the same way with the attention's collectives on
their sequence-parallel group. A call leaves no gather in flight (`call`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist


ALIGN = 16  # every tensor starts at a multiple of 16 bytes of its packed block: a view of any dtype is aligned
_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclasses.dataclass
class _Slot:
    """One parameter or buffer of a block's module, and how it is made again from plain tensors."""
    module: torch.nn.Module
    table: str  # "_parameters" or "_buffers"
    name: str
    leaves: list  # (offset, nbytes, dtype, shape) of each plain tensor in the packed block
    rebuild: Callable[[Iterator[torch.Tensor]], Any]
    empty: torch.Tensor  # what the attribute holds while the block is not computing (no bytes)


def _taken_apart(t: torch.Tensor, plain: list) -> Callable[[Iterator[torch.Tensor]], Any]:
    """Append `t`'s plain tensors to `plain`; returns rebuild(plain tensors in order) -> a tensor like `t`."""
    cls = type(t)
    is_param = isinstance(t, torch.nn.Parameter)  # also a subclass marked as one (_is_param)
    if cls not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, ctx = t.__tensor_flatten__()
        parts = [(n, _taken_apart(getattr(t, n), plain)) for n in names]
        size, stride = t.size(), t.stride()

        def unflatten(it):
            out = cls.__tensor_unflatten__({n: make(it) for n, make in parts}, ctx, size, stride)
            if is_param:
                out._is_param = True  # as torch.nn.Parameter marks a subclass, without detaching it
            return out
        return unflatten
    plain.append(torch.Tensor.as_subclass(t, torch.Tensor))
    if cls is torch.Tensor:
        return lambda it: next(it)
    if cls is torch.nn.Parameter:
        return lambda it: torch.nn.Parameter(next(it), requires_grad=False)
    state = dict(t.__dict__)  # e.g. GGMLTensor's tensor_type, tensor_shape, patches (LoRA, kept whole)

    def storage_subclass(it):
        out = next(it).as_subclass(cls)
        out.__dict__.update(state)
        return out
    return storage_subclass


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


class Block:
    """One transformer block's weights as this rank's shard; `install` / `release` its full weights. The shard
    lives on the device, or (`offload`: the device has no room for it, streaming.placement) in host memory."""

    def __init__(self, module: torch.nn.Module, rank: int, world: int, device: torch.device, offload: bool = False):
        self.module, self.slots, placed, seen = module, [], [], {}
        self.device, self.offloaded = device, offload
        offset = 0
        for owner in module.modules():
            for table in ("_parameters", "_buffers"):
                for name, t in getattr(owner, table).items():
                    if t is None:
                        continue
                    if id(t) in seen:  # one tensor under two names: packed once
                        self.slots.append(dataclasses.replace(seen[id(t)], module=owner, table=table, name=name))
                        continue
                    plain: list = []
                    rebuild = _taken_apart(t, plain)
                    leaves = []
                    for p in plain:
                        nbytes = p.numel() * p.element_size()
                        leaves.append((offset, nbytes, p.dtype, p.shape))
                        placed.append((p, offset, nbytes))
                        offset += -(-nbytes // ALIGN) * ALIGN
                    empty = torch.empty(0, dtype=t.dtype, device=device)
                    seen[id(t)] = _Slot(owner, table, name, leaves, rebuild, empty)
                    self.slots.append(seen[id(t)])
        self.nbytes = offset  # the packed block (aligned)
        self.world = world
        self.shard_bytes = -(-offset // (world * ALIGN)) * ALIGN  # NOTE: every rank's shard has this size
        lo, hi = rank * self.shard_bytes, (rank + 1) * self.shard_bytes
        pin = offload and torch.device(device).type == "cuda"  # page-locked: copied to the GPU asynchronously
        self.shard = torch.zeros(self.shard_bytes, dtype=torch.uint8, device="cpu" if offload else device,
                                 pin_memory=pin)
        for p, off, nbytes in placed:  # only this rank's range of each tensor is read (and moved to the device)
            a, b = max(lo, off), min(hi, off + nbytes)
            if a < b:
                self.shard[a - lo:b - lo].copy_(_bytes(p)[a - off:b - off])
        del placed, seen
        self.release()  # the full tensors go with the last reference ComfyUI's model held

    def gather(self, group=None):
        """Start gathering the full block: (work, buffer, this rank's shard on the device: kept until the work ends)."""
        full = torch.empty(self.shard_bytes * self.world, dtype=torch.uint8, device=self.device)
        mine = self.shard.to(self.device, non_blocking=True) if self.offloaded else self.shard
        return _gather(full, mine, group=group, async_op=True), full, mine

    def install(self, full: torch.Tensor) -> None:
        for slot in self.slots:
            views = (full[o:o + n].view(dtype).view(shape) for o, n, dtype, shape in slot.leaves)
            getattr(slot.module, slot.table)[slot.name] = slot.rebuild(views)

    def release(self) -> None:
        for slot in self.slots:
            getattr(slot.module, slot.table)[slot.name] = slot.empty


class SharedBlocks:
    """The blocks of one model, sharded over the world, with the hooks that gather them as the model runs."""

    def __init__(self, key: str, model: torch.nn.Module, blocks: list):
        self.key, self.model, self.blocks = key, model, blocks
        self.full_bytes = sum(b.nbytes for b in self.blocks)
        self.largest = max((b.nbytes for b in self.blocks), default=0)
        self.in_flight: dict[int, tuple] = {}  # block index -> (work, buffer): gathering or installed
        self.peak = self.now = 0  # bytes of full blocks present on this rank (peak since the last stats)
        self.gathers = 0
        self.hooks = []
        for i, m in enumerate(b.module for b in blocks):
            self.hooks.append(m.register_forward_pre_hook(lambda mod, args, i=i: self._before(i)))
            self.hooks.append(m.register_forward_hook(lambda mod, args, out, i=i: self._after(i)))

    @property
    def shard_bytes(self) -> int:
        return sum(b.shard_bytes for b in self.blocks)

    @property
    def offloaded_bytes(self) -> int:
        return sum(b.shard_bytes for b in self.blocks if b.offloaded)

    def _start(self, i: int) -> None:
        if i < len(self.blocks) and i not in self.in_flight:
            self.in_flight[i] = self.blocks[i].gather()
            self.gathers += 1
            self.now += self.in_flight[i][1].numel()
            self.peak = max(self.peak, self.now)

    def _before(self, i: int) -> None:
        # NOTE: collective order: block i's gather (if the previous block did not start it), then block i + 1's,
        # which runs while block i computes; every rank runs the blocks in the same order.
        self._start(i)
        work, full, _ = self.in_flight[i]
        work.wait()
        self.blocks[i].install(full)
        self._start(i + 1)

    def _after(self, i: int) -> None:
        self.blocks[i].release()
        _, full, _ = self.in_flight.pop(i)
        self.now -= full.numel()

    @contextlib.contextmanager
    def call(self):
        """Around one model call: whatever happens in it, no gather is left in flight and no block installed."""
        try:
            yield
        finally:
            for i, (work, full, _) in list(self.in_flight.items()):
                work.wait()  # NOTE: a started collective is finished on every rank, also after an error here
                self.blocks[i].release()
                self.now -= full.numel()
            self.in_flight.clear()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks, self.blocks = [], []
