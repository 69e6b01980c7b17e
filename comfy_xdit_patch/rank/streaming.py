"""A model that no rank holds whole (COMFY_XDIT_SHARD_WEIGHTS): its block weights go from the file straight into
each rank's 1/N shard, one block at a time; only the parts outside the blocks are loaded whole.

ComfyUI's loader reads a safetensors file as views of the mapped file (`comfy.utils.load_torch_file`: safetensors'
`get_tensor`, no copy; GGUF: numpy memmaps), then copies them into the model's own parameters (`load_state_dict`
without `assign`): a full copy of the model in every rank's host memory before `load_models_gpu` puts it whole
on the device. Here the rank lets ComfyUI's loader run as it is (detection, key conversion, dtype choice, quantized
layers) and steps in at one point, torch's load-state-dict pre-hook of the diffusion model, found by torch's
module-registration hook as ComfyUI's model attaches it (`deferred`):

- the blocks' parameters are turned into meta tensors before the copy (a copy into a meta tensor does nothing),
  and the loader's tensors of each block are kept by reference: pages of the mapped file, which every rank of
  the host shares through the page cache. Loaders that assign the file's tensors (ComfyUI's quantized layers,
  ComfyUI-GGUF) keep doing so: those stay file-backed as well.
- `stream`, in `prepare`: for each block in turn, its meta tensors are made on the rank's device, the block is
  loaded from the kept tensors by ComfyUI's own layers (`module.load_state_dict`: casts, quantized formats,
  GGUF as at load time), its LoRA patches are applied per key by the patcher (`patch_weight_to_device`, as
  `load_models_gpu` would), and `weights.Block` keeps this rank's 1/N of its bytes and drops the rest. A rank
  thus holds at most its shards so far plus one full block on the device, and of the file only what the page
  cache keeps (shared).
- Not sharded after all (`auto` found room for the whole model): `materialize` loads every block on the offload
  device as ComfyUI would have, and `load_models_gpu` goes on as usual.

Where even the shards don't fit (`placement`), the shards of the last blocks stay in host memory (page-locked on
CUDA) and each crosses to the device just before its all-gather; the parts outside the blocks are then loaded by
ComfyUI's own partial loading (`load_models_gpu` without `force_full_load`), as on a small card.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from typing import Callable

import torch

log = logging.getLogger("comfy_xdit_patch.weights")


@dataclasses.dataclass
class Pending:
    """The block weights of one diffusion model that its loader read but did not copy, per block."""
    blocks: list  # (block module, its key prefix in the diffusion model, {block-local key: the loader's tensor})
    names: tuple  # the model's block lists, e.g. ("double_blocks", "single_blocks")

    def keys(self) -> set:
        return {prefix + k for _, prefix, sd in self.blocks for k in sd}


def _local_tensors(block: torch.nn.Module):
    for path, owner in block.named_modules():
        for table in ("_parameters", "_buffers"):
            for name, t in getattr(owner, table).items():
                if t is not None:
                    yield f"{path}.{name}" if path else name, owner, table, name, t


def _meta(t: torch.Tensor) -> torch.Tensor:
    m = torch.empty(t.shape, dtype=t.dtype, device="meta")
    return torch.nn.Parameter(m, requires_grad=False) if isinstance(t, torch.nn.Parameter) else m


def _defer(found: dict, names: tuple, module, state_dict, prefix, *_):
    """Pre-hook of the diffusion model's load_state_dict: keep each block's tensors, make its parameters meta."""
    pending = Pending([], names)
    for name in names:
        for i, block in enumerate(getattr(module, name, ())):
            head = f"{prefix}{name}.{i}."
            sd = {k[len(head):]: v for k, v in state_dict.items() if k.startswith(head)}
            for local, owner, table, attr, t in _local_tensors(block):
                if local in sd and type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_meta:
                    getattr(owner, table)[attr] = _meta(t)  # never touched: its pages were never resident
            pending.blocks.append((block, f"{name}.{i}.", sd))
    found[id(module)] = pending


@contextlib.contextmanager
def deferred(blocks_of: Callable[[torch.nn.Module], tuple]):
    """While ComfyUI's loader runs in it: a diffusion model (a module attached as `diffusion_model`) whose
    `blocks_of(model)` names block lists loads everything but those blocks; yields {id(model): Pending}."""
    found: dict = {}
    hooks = []

    def attached(parent, name, sub):
        names = blocks_of(sub) if name == "diffusion_model" else ()
        if names:
            hooks.append(sub.register_load_state_dict_pre_hook(
                lambda *a: _defer(found, names, *a)))

    handle = torch.nn.modules.module.register_module_module_registration_hook(attached)
    try:
        with warnings.catch_warnings():
            # torch warns once per key that copying into a meta parameter does nothing: here that is the point
            warnings.filterwarnings("ignore", message=".*meta parameter in the current model.*")
            yield found
    finally:
        handle.remove()
        for h in hooks:
            h.remove()


def _materialize(block: torch.nn.Module, device) -> None:
    for _, owner, table, attr, t in list(_local_tensors(block)):
        if t.is_meta:
            made = torch.empty(t.shape, dtype=t.dtype, device=device)
            getattr(owner, table)[attr] = torch.nn.Parameter(made, requires_grad=False) \
                if isinstance(t, torch.nn.Parameter) else made


def _load_block(block, sd: dict, device) -> None:
    """The block's weights as ComfyUI's layers load them (their own _load_from_state_dict), onto `device`."""
    _materialize(block, device)
    block.load_state_dict(dict(sd), strict=False)  # a copy: quantized layers pop the keys they read


def materialize(pending: Pending, device) -> None:
    """Not sharded after all: every block loaded on `device` (the offload device), as ComfyUI's loader does."""
    for block, _, sd in pending.blocks:
        _load_block(block, sd, device)
    pending.blocks.clear()


def tensor_bytes(t: torch.Tensor) -> int:
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        return sum(tensor_bytes(getattr(t, n)) for n in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def block_bytes(pending: Pending) -> list[int]:
    """Each block's size as it will be loaded (meta tensors have the model's dtype; assigned ones are real)."""
    return [sum(tensor_bytes(t) for *_, t in _local_tensors(b)) for b, _, _ in pending.blocks]


def placement(sizes: list[int], world: int, room: float) -> list[bool]:
    """Which blocks' shards stay on the device (True) with `room` bytes for shards there: in model order, each
    that still fits; the rest wait in host memory (page-locked on CUDA) and cross just before their gather."""
    out, used = [], 0
    for n in sizes:
        share = -(-n // world)
        out.append(used + share <= room)
        used += share if out[-1] else 0
    return out


def stream(pending: Pending, patcher, make_block: Callable, device, watch=None) -> list:
    """Each pending block loaded on `device`, patched, and handed to `make_block(module, index)` (which keeps
    this rank's shard and releases the block); `watch(event, model, blocks so far, block lists)` (diagnostics)
    after each step."""
    model = patcher.model.diffusion_model
    blocks = []
    for i, (block, prefix, sd) in enumerate(pending.blocks):
        _load_block(block, sd, device)
        head = f"diffusion_model.{prefix}"
        for local, *_ in list(_local_tensors(block)):
            key = head + local
            if key in patcher.patches:
                # ComfyUI's own per-key patching (LoRA and any other weight patch), as load_models_gpu runs it
                patcher.patch_weight_to_device(key, device_to=device)
                patcher.backup.pop(key, None)  # NOTE: never unpatched: a new spec builds the model again
        sd.clear()
        if watch is not None:
            watch("loaded", model, blocks, pending.names)
        blocks.append(make_block(block, i))
        if watch is not None:
            watch("sharded", model, blocks, pending.names)
    prefixes = tuple(f"diffusion_model.{name}." for name in pending.names)
    for key in [k for k in patcher.patches if k.startswith(prefixes)]:
        del patcher.patches[key]  # in the shards now; load_models_gpu must not patch the empty tensors
    pending.blocks.clear()
    return blocks
