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
import logging
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from . import streaming

log = logging.getLogger("comfy_xdit_patch.weights")
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


def _tensors(module: torch.nn.Module):
    for m in module.modules():
        yield from (t for t in m._parameters.values() if t is not None)
        yield from (t for t in m._buffers.values() if t is not None)


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages under `tensors` (a wrapper subclass: its inner tensors')."""
    seen, total = set(), 0

    def count(t):
        nonlocal total
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            for n in t.__tensor_flatten__()[0]:
                count(getattr(t, n))
            return
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()

    for t in tensors:
        count(t)
    return total


def block_tensors(model: torch.nn.Module, block_lists: tuple, backup: dict | None = None) -> list:
    """The tensors the model's blocks hold now, and ComfyUI's backup of their weights (a LoRA'd key's original
    weight): what a rank keeps of its blocks besides any shards."""
    out = [t for name in block_lists for block in getattr(model, name, ()) for t in _tensors(block)]
    prefixes = tuple(f"diffusion_model.{name}." for name in block_lists)
    return out + [bk.weight for key, bk in (backup or {}).items() if key.startswith(prefixes)]


class RankWeights:
    """A rank's side of COMFY_XDIT_SHARD_WEIGHTS: whether its current model is sharded, and for which spec."""

    def __init__(self, setting: str, rank: int, world: int, device: torch.device):
        self.setting, self.rank, self.world, self.device = setting, rank, world, device
        self.shared: dict[int, SharedBlocks] = {}  # id(diffusion model) -> its shards
        self.current = None  # (spec key, patcher, block lists) of the last prepare
        self.unsettled = False  # auto on GPUs: a prepare came since the ranks last agreed
        self.pending: dict = {}  # id(diffusion model) -> streaming.Pending: built with its blocks not loaded
        self.watch = None  # diagnostics only (tools/diagnostics.LoadWatch), called as a load streams its blocks

    def building(self):
        """Around building a model (prepare): where it may be sharded, its blocks are left in the file for
        `before_load` to stream into the shards (rank/streaming.py); elsewhere ComfyUI's loader as it is."""
        wants = self.world > 1 and (self.setting == "on" or (self.setting == "auto" and self.device.type == "cuda"))
        return self._deferred() if wants else contextlib.nullcontext()

    @contextlib.contextmanager
    def _deferred(self):
        from .. import plans

        with streaming.deferred(lambda m: plans.plan_for(m).blocks if plans.plan_for(m) else ()) as found:
            yield
        self.pending.update(found)

    def before_load(self, key: str, patcher, block_lists: tuple) -> bool:
        """Before load_models_gpu (prepare): a model built with its blocks left in the file is sharded block by
        block where wanted, else its blocks are loaded as ComfyUI would. Local only. Returns whether ComfyUI
        should load the model (the rest, where sharded) whole: not where it can't, then its partial loading."""
        model = patcher.model.diffusion_model
        pending = self.pending.pop(id(model), None)
        if pending is not None and not self._wanted(patcher, loaded=False):
            streaming.materialize(pending, patcher.offload_device)
        elif pending is not None:
            sizes = streaming.block_bytes(pending)
            home = streaming.placement(sizes, self.world, self._room(patcher, sizes))
            blocks = streaming.stream(pending, patcher, lambda m, i: Block(
                m, self.rank, self.world, self.device, offload=not home[i]), self.device, self.watch)
            self.shared[id(model)] = shared = SharedBlocks(key, model, blocks)
            patcher.size = 0  # NOTE: ComfyUI's cached model size counted the blocks, which it no longer holds
            log.info("streamed %d blocks into shards: %.1f of %.1f MiB kept on this rank (%.1f MiB in host memory)",
                     len(blocks), shared.shard_bytes / 2**20, shared.full_bytes / 2**20, shared.offloaded_bytes / 2**20)
        shared = self.shared.get(id(model))
        if shared is not None:
            return not shared.offloaded_bytes
        return self._fits(patcher)  # else ComfyUI's partial loading, as ComfyUI alone does on a small card

    def _fits(self, patcher) -> bool:
        """The whole model and a 1024² CFG call fit this rank's GPU (ComfyUI's estimate and reserve); a CPU: yes."""
        if self.device.type != "cuda":
            return True
        import comfy.model_management as mm

        return mm.get_free_memory(self.device) + patcher.loaded_size() >= patcher.model_size() + self._need(patcher)

    def _room(self, patcher, sizes: list) -> float:
        """Bytes the device has for block shards once the rest of the model, a 1024² CFG call's activations, two
        gathered blocks and ComfyUI's reserve (--reserve-vram) are counted: the same budget as ComfyUI's."""
        if self.device.type != "cuda":
            return float("inf")  # a CPU rank's device is the host
        import comfy.model_management as mm

        rest = patcher.model_size() - sum(sizes)  # the meta blocks still count in ComfyUI's size
        return mm.get_free_memory(self.device) - self._need(patcher) - rest - 2 * max(sizes, default=0)

    def stale(self, key: str) -> list:
        """Diffusion models sharded for another spec than `key`. ComfyUI can't restore or re-patch weights its
        model no longer holds, so the rank builds such a model again from its files (worker: its base goes)."""
        return [s.model for s in self.shared.values() if s.key != key]

    def forget(self, model) -> None:
        self.pending.pop(id(model), None)
        shared = self.shared.pop(id(model), None)
        if shared is not None:
            shared.remove()
        if self.current is not None and self.current[1].model.diffusion_model is model:
            self.current = None

    def after_load(self, key: str, patcher, block_lists: tuple) -> None:
        """After ComfyUI loaded and patched the spec's model (prepare): shard it where wanted. Local only."""
        self.current = (key, patcher, block_lists)
        self.unsettled = self.setting == "auto" and self.world > 1 and self.device.type == "cuda"
        if id(patcher.model.diffusion_model) not in self.shared and self._wanted(patcher):
            self._shard()

    def _wanted(self, patcher, loaded: bool = True) -> bool:
        """Shard? `on`; `auto` where the device can't hold a 1024² CFG call beside the model (`loaded`: it is
        on the device already, else it would have to be)."""
        if self.world < 2 or self.setting == "off":
            return False
        if self.setting == "on":
            return True
        if self.device.type != "cuda":  # auto: a CPU rank's memory is the host's
            return False
        import comfy.model_management as mm

        return mm.get_free_memory(self.device) < self._need(patcher) if loaded else not self._fits(patcher)

    @staticmethod
    def _need(patcher) -> int:
        import comfy.model_management as mm

        fmt = patcher.model.latent_format  # a CFG batch of two 1024² latents
        side = 1024 // fmt.spacial_downscale_ratio
        return patcher.memory_required([2, fmt.latent_channels, side, side]) + mm.extra_reserved_memory()

    def _shard(self) -> None:
        key, patcher, block_lists = self.current
        model = patcher.model.diffusion_model
        modules = [b for name in block_lists for b in getattr(model, name, ())]
        blocks = [Block(m, self.rank, self.world, self.device) for m in modules]
        self.shared[id(model)] = shared = SharedBlocks(key, model, blocks)
        # NOTE: ComfyUI's backup of LoRA'd block weights (their originals; host memory on GPUs) goes too: a sharded
        # model is never unpatched, the rank builds it again for another spec (stale)
        prefixes = tuple(f"diffusion_model.{name}." for name in block_lists)
        for k in [k for k in patcher.backup if k.startswith(prefixes)]:
            del patcher.backup[k]
        log.info("sharded %d blocks: %.1f of %.1f MiB kept on this rank", len(shared.blocks),
                 shared.shard_bytes / 2**20, shared.full_bytes / 2**20)

    def settle(self) -> None:
        """Before the first call after a prepare, under `auto` on GPUs: ranks that decided alone agree."""
        if not self.unsettled or self.current is None:
            return
        self.unsettled = False
        sharded = id(self.current[1].model.diffusion_model) in self.shared
        flag = torch.tensor([int(sharded)], device=self.device)
        # NOTE: collective over the whole world, on every rank at the same call (each prepare sets `unsettled`
        # on every rank that replied Ready, and calls follow only a prepare every rank answered Ready). Any rank
        # sharding makes all shard: sharding is local, gathering a model back whole would not be.
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not sharded:
            self._shard()

    def sharded(self, key: str) -> bool:
        return any(s.key == key for s in self.shared.values())

    def call(self, key: str):
        shared = next((s for s in self.shared.values() if s.key == key), None)
        return shared.call() if shared is not None else contextlib.nullcontext()

    def stats(self, reset: bool = False) -> dict:
        """What this rank holds of its current model's weights (the "stats" reply's `weights`)."""
        out = {"setting": self.setting, "sharded": False, "world": self.world}
        if self.current is None:
            return out
        _, patcher, block_lists = self.current
        model = patcher.model.diffusion_model
        shared = self.shared.get(id(model))
        held = held_bytes(block_tensors(model, block_lists, patcher.backup))
        out.update(model_bytes=held_bytes(_tensors(model)) + (shared.shard_bytes if shared else 0))
        if shared is None:
            out.update(block_bytes=held, resident_bytes=held)
            return out
        on_device = shared.shard_bytes - shared.offloaded_bytes  # the rest waits in host memory (placement)
        out.update(sharded=True, blocks=len(shared.blocks), block_bytes=shared.full_bytes,
                   largest_block=shared.largest, shard_bytes=shared.shard_bytes, offloaded_bytes=shared.offloaded_bytes,
                   resident_bytes=on_device + held, peak_bytes=on_device + shared.peak, gathers=shared.gathers)
        if reset:
            shared.peak = shared.now
        return out
