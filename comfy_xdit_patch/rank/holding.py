"""What a rank holds of its model's weights, and where: COMFY_XDIT_SHARD_WEIGHTS decided per model as it loads.

- Sharded (rank/weights.py): 1/N of every block on each rank, streamed from the file into the shards as the model
  loads (rank/streaming.py) where the rank knows beforehand, else taken from the model ComfyUI loaded.
- Whole: a GPU rank with room for the model builds it with its blocks left in the mapped file as well, then loads
  them block by block straight onto its device (`before_load`): no full copy of the model in the rank's host
  memory on the way (ComfyUI's loader would copy it there first, then to the device), which is what lets a host
  run several ranks beside ComfyUI's own process. ComfyUI then loads the rest and patches the weights (LoRA) as
  it always does, and keeps managing the model: unpatching, unloading to host memory, loading again.
- Partly: a model that fits neither way goes to ComfyUI's own partial loading, as on a small card.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from . import streaming
from .weights import Block, SharedBlocks

log = logging.getLogger("comfy_xdit_patch.weights")


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
        """Around building a model (prepare): on a GPU rank (or where the model is sharded anyway) its blocks are
        left in the file for `before_load` to stream into the shards or onto the device (rank/streaming.py); a CPU
        rank's device is the host, where ComfyUI's loader puts them as it is."""
        wants = self.device.type == "cuda" or (self.world > 1 and self.setting == "on")
        return self._deferred() if wants else contextlib.nullcontext()

    @contextlib.contextmanager
    def _deferred(self):
        from .. import plans

        with streaming.deferred(lambda m: plans.plan_for(m).blocks if plans.plan_for(m) else ()) as found:
            yield
        self.pending.update(found)

    def before_load(self, key: str, patcher, block_lists: tuple) -> bool:
        """Before load_models_gpu (prepare): a model built with its blocks left in the file is sharded block by
        block where wanted, else its blocks are loaded onto the device where the whole model fits, or into host
        memory for ComfyUI's partial loading. Local only. Returns whether ComfyUI should load the model (the rest,
        where sharded) whole: not where it can't, then its partial loading."""
        model = patcher.model.diffusion_model
        pending = self.pending.pop(id(model), None)
        if pending is not None and not self._wanted(patcher, loaded=False):
            whole = self._fits(patcher)  # NOTE: decided before the blocks take the device's memory
            # whole: each block straight onto the device (ComfyUI's full load then finds them there); else into host
            # memory, as ComfyUI's loader would have put them, for its partial loading
            streaming.materialize(pending, patcher.load_device if whole else patcher.offload_device)
            return whole
        if pending is not None:
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
