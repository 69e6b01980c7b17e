"""What the workers need to build the same model as ComfyUI's process: a picklable ModelSpec.

`recipe` is ComfyUI's own record of how the model was loaded (`ModelPatcher.cached_patcher_init`);
for a model whose loader records none, it replays the loader node (loaders.py). `files` are the files
it reads, stamped (size, time): a changed file is another model, and a rank that sees another file
refuses it before the first step.
LoRA and other weight patches (`patcher.patches`, whose `patches_uuid` ComfyUI bumps on every change)
and object patches that act inside the model travel with the spec, through the channel's payload;
the group sends the patches only to ranks that don't hold that spec yet (see WorkerGroup.prepare).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import uuid

from . import loaders
from .errors import Unroutable

# Object patches applied before the diffusion model is called, in ComfyUI's process only.
MAIN_ONLY_OBJECT_PATCHES = ("model_sampling", "latent_format")
# NOTE: ComfyUI gives every new patcher (each loader run, each process) a new patches_uuid, also with no
# weight patches at all. A rank compares it with its model's current one to decide whether to restore and
# re-patch the weights (ModelPatcher.partially_load): for FLUX.1-dev, 24 GB to the CPU and back, 23 s on
# an H200, for the same weights. Unpatched weights are one state, whoever asks for them.
NO_PATCHES = uuid.UUID(int=0)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    base_key: str  # the loaded file and loader options
    key: str  # base + patches
    recipe: tuple
    patches: dict | None  # patcher.patches; None when the ranks already hold this spec
    patches_uuid: uuid.UUID
    object_patches: dict
    force_cast_weights: bool
    files: tuple = ()  # (path, size, mtime_ns) of each file the model was loaded from; each rank's node needs them


def missing_files(spec: ModelSpec) -> list[str]:
    """The model's files that are not on this node (checked on each rank before it loads)."""
    return [path for path, *_ in spec.files if not os.path.isfile(path)]


def _fingerprint(recipe: tuple, files: tuple) -> str:
    fn, args = recipe[0], recipe[1]
    return f"{fn.__module__}.{fn.__qualname__}{args!r}{recipe[2:]!r}{files!r}"


def spec_for(patcher) -> ModelSpec:
    recipe = getattr(patcher, "cached_patcher_init", None)
    if recipe is None:
        call = loaders.recorded(patcher)
        recipe, files = (loaders.replay, (call,)), call.files
    else:
        files = patcher.attachments.get(loaders.FILES)  # stamped when the loader node ran
        if files is None:
            # the loader's file arguments as this process sees them now (absolute paths, not folders)
            files = loaders.stamps(a for a in recipe[1] if isinstance(a, str) and os.path.isabs(a)
                                   and not os.path.isdir(a))
    if patcher.hook_patches or patcher.weight_wrapper_patches:
        raise Unroutable("hook or weight-wrapper patches on the model")
    objects = {k: v for k, v in patcher.object_patches.items() if k not in MAIN_ONLY_OBJECT_PATCHES}
    try:
        pickle.dumps(recipe)
        objects_id = hashlib.sha1(pickle.dumps(objects)).hexdigest()
    except Exception as e:
        raise Unroutable(f"the model's recipe or object patches can't be sent to workers ({e})") from e
    base = _fingerprint(recipe, files)
    patches_uuid = patcher.patches_uuid if patcher.patches else NO_PATCHES
    key = f"{base}|{patches_uuid}|{objects_id}|{patcher.force_cast_weights}"
    return ModelSpec(base, key, recipe, patcher.patches, patches_uuid, objects, patcher.force_cast_weights, files)


def base_only(spec: ModelSpec) -> ModelSpec:
    """The spec's base model alone (no weight or object patches): what a new group can load ahead."""
    return dataclasses.replace(spec, key=f"{spec.base_key}|base", patches={}, patches_uuid=NO_PATCHES,
                               object_patches={}, force_cast_weights=False)

