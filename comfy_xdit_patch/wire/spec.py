"""What ComfyUI's process sends the ranks so that they build the same model: a ModelSpec.

`recipe` is ComfyUI's own record of how the model was loaded (`ModelPatcher.cached_patcher_init`); for a
model whose loader records none, `node` is the loader node that made it, which the ranks run again
(a NodeCall: driver/models.py records it, rank/models.py replays it). `files` are the files it reads,
stamped (size, time): a changed file is another model, and a rank that sees another file refuses it
before the first step. LoRA and other weight patches (`patcher.patches`, whose `patches_uuid` ComfyUI
bumps on every change) and object patches that act inside the model travel with the spec, through the
channel's payload; the group sends the patches only to ranks that don't hold that spec yet
(WorkerGroup.prepare).
"""
from __future__ import annotations

import dataclasses
import uuid

KEY = "comfy_xdit_patch.loader"  # the patcher attachment: a NodeCall
FILES = "comfy_xdit_patch.files"  # the patcher attachment: stamps of a recipe's files when it loaded


@dataclasses.dataclass(frozen=True)
class NodeCall:
    module: str  # the node class's module and qualified name
    qualname: str
    package: str | None  # file or folder ComfyUI loaded it from as a custom node; None: importable by name
    parent: str  # load_custom_node's module_parent ("custom_nodes", "comfy_extras")
    inputs: dict  # input name -> [value], as ComfyUI's executor passes them
    v3_data: object
    output: int  # which output is the MODEL
    files: tuple  # (path, size, mtime_ns) of each file the inputs name, as this process sees it
    folders: dict = dataclasses.field(repr=False)  # folder_paths.folder_names_and_paths
    problem: str | None = None  # why the ranks can't replay it


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
    recipe: tuple | None  # (loader function, args[, output index]); None: `node` made it
    patches: dict | None  # patcher.patches; None when the ranks already hold this spec
    patches_uuid: uuid.UUID
    object_patches: dict
    force_cast_weights: bool
    files: tuple = ()  # (path, size, mtime_ns) of each file the model was loaded from; each rank's node needs them
    node: NodeCall | None = None  # the loader node that made a model without a recipe


def base_only(spec: ModelSpec) -> ModelSpec:
    """The spec's base model alone (no weight or object patches): what a new group can load ahead."""
    return dataclasses.replace(spec, key=f"{spec.base_key}|base", patches={}, patches_uuid=NO_PATCHES,
                               object_patches={}, force_cast_weights=False)
