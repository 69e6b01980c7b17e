"""What the workers need to build the same model as ComfyUI's process: a picklable ModelSpec.

`recipe` is ComfyUI's own record of how the model was loaded (`ModelPatcher.cached_patcher_init`).
LoRA and other weight patches travel once through Ray's object store (keyed by `patches_uuid`, which
ComfyUI bumps on every change); object patches that act inside the model travel by value.
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
    patches: object  # ray.ObjectRef of patcher.patches, or None
    patches_uuid: uuid.UUID
    object_patches: dict
    force_cast_weights: bool


def _fingerprint(recipe: tuple) -> str:
    fn, args = recipe[0], recipe[1]
    stamps = []
    for a in args:
        if isinstance(a, str) and os.path.isfile(a):
            st = os.stat(a)
            stamps.append((a, st.st_size, st.st_mtime_ns))
    return f"{fn.__module__}.{fn.__qualname__}{args!r}{recipe[2:]!r}{stamps!r}"


class SpecCache:
    """Keeps the object-store copy of each patch set alive while it may be used."""

    def __init__(self):
        self._refs: dict[uuid.UUID, object] = {}

    def spec(self, patcher) -> ModelSpec:
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
        ref = None
        if patcher.patches:
            ref = self._refs.get(patcher.patches_uuid)
            if ref is None:
                import ray

                self._refs.clear()  # NOTE: one patch set in flight at a time is all the workers hold
                ref = self._refs[patcher.patches_uuid] = ray.put(patcher.patches)
        base = _fingerprint(recipe)
        key = f"{base}|{patcher.patches_uuid}|{objects_id}|{patcher.force_cast_weights}"
        return ModelSpec(base, key, recipe, ref, patcher.patches_uuid, objects, patcher.force_cast_weights)

    def clear(self) -> None:
        self._refs.clear()
