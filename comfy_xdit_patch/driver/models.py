"""ComfyUI's side of a model: what the ranks need to build the same one (`spec_for`), and for models that
no recipe describes, which loader node made them.

ComfyUI's core loaders record how they loaded a model (`ModelPatcher.cached_patcher_init`); custom
loaders (ComfyUI-GGUF's UnetLoaderGGUF, a user's own node) don't. For those, `record` wraps ComfyUI's
execution of every node (`execution.get_output_data`): when a node returns a MODEL that has neither
a recipe nor a record, that node made it, and a `NodeCall` (the node's class, where its custom-node
package lives, its inputs as the executor passed them, ComfyUI's model folders and the files the
inputs name) goes on the patcher as an attachment, which ComfyUI copies to every clone (LoRA,
model-sampling nodes...). The ranks replay it (rank/models.py).
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import os
import pickle
import sys

from ..errors import Unroutable
from ..wire.spec import FILES, KEY, NO_PATCHES, MAIN_ONLY_OBJECT_PATCHES, ModelSpec, NodeCall

log = logging.getLogger("comfy_xdit_patch.loaders")


def stamps(paths) -> tuple:
    """(path, size, mtime_ns) of each file; (path, None, None) for one that is gone (the ranks' nodes then
    report it missing, naming node and path, rather than fail in the loader)."""
    out = []
    for p in sorted(set(paths)):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            out.append((p, None, None))
            continue
        out.append((p, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _named_files(values, folders) -> list[str]:
    """Files a loader's string inputs name: a path, or a file name in one of ComfyUI's model folders."""
    import folder_paths

    found = []
    for v in values:
        if not isinstance(v, str) or not v or len(v) > 4096:
            continue
        if os.path.isfile(v):
            found.append(os.path.abspath(v))
            continue
        for name in folders:
            path = folder_paths.get_full_path(name, v)
            if path is not None:
                found.append(os.path.abspath(path))
    return found


def _where(cls) -> tuple[str | None, str]:
    """The custom-node file or folder a class came from (None: its module imports by name) and parent."""
    top = cls.__module__.split(".")[0]
    module = sys.modules.get(top)
    file = getattr(module, "__file__", None)
    parent = (getattr(cls, "RELATIVE_PYTHON_MODULE", None) or "custom_nodes").split(".")[0]
    if file is None or os.sep not in top:  # ComfyUI's custom-node modules are named by their path
        return None, parent
    return (os.path.dirname(file) if os.path.basename(file) == "__init__.py" else file), parent


def _unsendable(inputs) -> str | None:
    import torch
    import torch.utils._pytree as pytree

    for leaf in pytree.tree_leaves(inputs):
        if isinstance(leaf, (torch.Tensor, torch.nn.Module)) or hasattr(leaf, "model_patches_to"):
            return f"an input is a {type(leaf).__name__}"
    try:
        pickle.dumps(inputs)
    except Exception as e:
        return f"an input can't be sent to the ranks ({type(e).__name__}: {e})"
    return None


def note(obj, inputs: dict, v3_data, outputs) -> None:
    """Attach a NodeCall to each MODEL `obj` returned that no recipe or earlier record describes; stamp
    the files of a new recipe's, a MODEL's or a VAE's (so that a file changed since is refused by the ranks,
    not loaded)."""
    import comfy.model_patcher
    import comfy.sd
    import folder_paths

    cls = obj if isinstance(obj, type) else type(obj)
    for index, values in enumerate(outputs or ()):
        for patcher in values if isinstance(values, list) else ():
            vae = isinstance(patcher, comfy.sd.VAE)
            patcher = getattr(patcher, "patcher", None) if vae else patcher  # a VAE's too (driver/decode.py)
            if not isinstance(patcher, comfy.model_patcher.ModelPatcher) or KEY in patcher.attachments:
                continue
            if vae or patcher.cached_patcher_init is not None:
                if patcher.cached_patcher_init is None:
                    continue  # a VAE no recipe describes is decoded in ComfyUI's process: nothing to replay
                if FILES not in patcher.attachments:  # NOTE: the file as loaded, not as it may be by the run
                    args = patcher.cached_patcher_init[1]
                    patcher.attachments[FILES] = stamps(a for a in args if isinstance(a, str) and os.path.isfile(a))
                continue
            problem = None
            if len(values) != 1 or getattr(cls, "INPUT_IS_LIST", False):
                problem = "the node ran over a list of inputs"
            problem = problem or _unsendable((inputs, v3_data))
            folders = copy.deepcopy(folder_paths.folder_names_and_paths)
            files = ()
            if problem is None:
                try:
                    files = stamps(_named_files([v[0] for v in inputs.values() if len(v) == 1], folders))
                except OSError as e:
                    problem = f"a file it read is gone ({e})"
            package, parent = _where(cls)
            call = NodeCall(cls.__module__, cls.__qualname__, package, parent, inputs if problem is None else {},
                            v3_data if problem is None else None, index, files, folders, problem)
            patcher.attachments[KEY] = call
            log.debug("comfy_xdit_patch: %s made a model without a recipe; the ranks will replay it", cls.__qualname__)


async def record(wrapped, _instance, args, kwargs):
    """Around execution.get_output_data(prompt_id, unique_id, obj, input_data_all, ..., v3_data=...)."""
    result = await wrapped(*args, **kwargs)
    try:
        named = dict(zip(("prompt_id", "unique_id", "obj", "input_data_all"), args), **kwargs)
        output, _, _, pending = result
        if not pending:
            note(named["obj"], named["input_data_all"], named.get("v3_data"), output)
    except Exception:  # recording must never break ComfyUI's execution; the model then runs locally
        log.debug("comfy_xdit_patch: could not record a loader node", exc_info=True)
    return result


def run_node(cls, **inputs) -> tuple:
    """A node's outputs, run through ComfyUI's executor with its MODEL outputs recorded (bench, scripts)."""
    import execution

    body = (None, "comfy_xdit", cls(), {k: [v] for k, v in inputs.items()})
    output, _, _, pending = asyncio.run(record(execution.get_output_data, None, body, {}))
    if pending:
        raise RuntimeError(f"{cls.__qualname__} is an async node")
    return tuple(o[0] for o in output)


def recorded(patcher) -> NodeCall:
    """The NodeCall that made this patcher's model; Unroutable when there is none or it can't be replayed."""
    call = patcher.attachments.get(KEY)
    if call is None:
        raise Unroutable("the model's loader records no cached_patcher_init recipe and was not run by ComfyUI's "
                         "executor while comfy_xdit_patch was installed")
    if call.problem:
        raise Unroutable(f"the ranks can't replay the loader node {call.qualname}: {call.problem}")
    return call


def _fingerprint(recipe: tuple | None, node: NodeCall | None, files: tuple) -> str:
    if node is not None:
        return f"node:{node!r}{files!r}"  # NOTE: NodeCall's repr leaves out the model folders
    fn, args = recipe[0], recipe[1]
    return f"{fn.__module__}.{fn.__qualname__}{args!r}{recipe[2:]!r}{files!r}"


def spec_for(patcher) -> ModelSpec:
    recipe, node = getattr(patcher, "cached_patcher_init", None), None
    if recipe is None:
        node = recorded(patcher)
        files = node.files
    else:
        files = patcher.attachments.get(FILES)  # stamped when the loader node ran
        if files is None:
            # the loader's file arguments as this process sees them now (absolute paths, not folders)
            files = stamps(a for a in recipe[1] if isinstance(a, str) and os.path.isabs(a) and not os.path.isdir(a))
    if patcher.hook_patches or patcher.weight_wrapper_patches:
        raise Unroutable("hook or weight-wrapper patches on the model")
    objects = {k: v for k, v in patcher.object_patches.items() if k not in MAIN_ONLY_OBJECT_PATCHES}
    try:
        pickle.dumps((recipe, node))
        objects_id = hashlib.sha1(pickle.dumps(objects)).hexdigest()
    except Exception as e:
        raise Unroutable(f"the model's recipe or object patches can't be sent to workers ({e})") from e
    base = _fingerprint(recipe, node, files)
    patches_uuid = patcher.patches_uuid if patcher.patches else NO_PATCHES
    key = f"{base}|{patches_uuid}|{objects_id}|{patcher.force_cast_weights}"
    return ModelSpec(base, key, recipe, patcher.patches, patches_uuid, objects, patcher.force_cast_weights, files,
                     node)
