"""What the workers need to build the same model as ComfyUI's process: a picklable ModelSpec.

`recipe` is ComfyUI's own record of how the model was loaded (`ModelPatcher.cached_patcher_init`).
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

from .errors import Unroutable

# Object patches applied before the diffusion model is called, in ComfyUI's process only.
MAIN_ONLY_OBJECT_PATCHES = ("model_sampling", "latent_format")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    base_key: str  # the loaded file and loader options
    key: str  # base + patches
    recipe: tuple
    patches: dict | None  # patcher.patches; None when the ranks already hold this spec
    patches_uuid: uuid.UUID
    object_patches: dict
    force_cast_weights: bool
    files: tuple[str, ...] = ()  # the recipe's arguments that are files here; each rank's node needs them


def missing_files(spec: ModelSpec) -> list[str]:
    """The model's files that are not on this node (checked on each rank before it loads)."""
    return [p for p in spec.files if not os.path.isfile(p)]


def _fingerprint(recipe: tuple) -> str:
    fn, args = recipe[0], recipe[1]
    stamps = []
    for a in args:
        if isinstance(a, str) and os.path.isfile(a):
            st = os.stat(a)
            stamps.append((a, st.st_size, st.st_mtime_ns))
    return f"{fn.__module__}.{fn.__qualname__}{args!r}{recipe[2:]!r}{stamps!r}"


def spec_for(patcher) -> ModelSpec:
    recipe = getattr(patcher, "cached_patcher_init", None)
    if recipe is None:
        raise Unroutable("the model's loader records no cached_patcher_init recipe")
    if patcher.hook_patches or patcher.weight_wrapper_patches:
        raise Unroutable("hook or weight-wrapper patches on the model")
    objects = {k: v for k, v in patcher.object_patches.items() if k not in MAIN_ONLY_OBJECT_PATCHES}
    try:
        pickle.dumps(recipe)
        objects_id = hashlib.sha1(pickle.dumps(objects)).hexdigest()
    except Exception as e:
        raise Unroutable(f"the model's recipe or object patches can't be sent to workers ({e})") from e
    base = _fingerprint(recipe)
    key = f"{base}|{patcher.patches_uuid}|{objects_id}|{patcher.force_cast_weights}"
    # the loader's file arguments (absolute paths that are not directories here; a file that went away
    # here too is then reported as missing on the ranks' nodes, rather than as a loader's traceback)
    files = tuple(a for a in recipe[1] if isinstance(a, str) and os.path.isabs(a) and not os.path.isdir(a))
    return ModelSpec(base, key, recipe, patcher.patches, patcher.patches_uuid, objects, patcher.force_cast_weights,
                     files)
