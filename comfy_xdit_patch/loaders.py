"""Models that no recipe describes: the ranks replay the loader node that made them.

ComfyUI's core loaders record how they loaded a model (`ModelPatcher.cached_patcher_init`); custom
loaders (ComfyUI-GGUF's UnetLoaderGGUF, a user's own node) don't. For those, `record` wraps ComfyUI's
execution of every node (`execution.get_output_data`): when a node returns a MODEL that has neither
a recipe nor a record, that node made it, and a `NodeCall` (the node's class, where its custom-node
package lives, its inputs as the executor passed them, ComfyUI's model folders and the files the
inputs name) goes on the patcher as an attachment, which ComfyUI copies to every clone (LoRA,
model-sampling nodes...). A rank replays it with `replay`: it loads that package the way ComfyUI
loads custom nodes and runs the node through ComfyUI's own `get_output_data`.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import pickle
import stat
import sys
import traceback

from .errors import Unroutable

log = logging.getLogger("comfy_xdit_patch.loaders")

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
    the files of a new recipe's (so that a file changed since is refused by the ranks, not loaded)."""
    import comfy.model_patcher
    import folder_paths

    cls = obj if isinstance(obj, type) else type(obj)
    for index, values in enumerate(outputs or ()):
        for patcher in values if isinstance(values, list) else ():
            if not isinstance(patcher, comfy.model_patcher.ModelPatcher) or KEY in patcher.attachments:
                continue
            if patcher.cached_patcher_init is not None:
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


def complete(coroutine):
    """Run one of ComfyUI's coroutines to its end from synchronous code (a rank, the bench)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def run_node(cls, **inputs) -> tuple:
    """A node's outputs, run through ComfyUI's executor with its MODEL outputs recorded (bench, scripts)."""
    import execution

    body = (None, "comfy_xdit", cls(), {k: [v] for k, v in inputs.items()})
    output, _, _, pending = complete(record(execution.get_output_data, None, body, {}))
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


def check_files(files, rank: int = 0) -> None:
    """On a rank: every file the model was loaded from is the same file here (size and time)."""
    for path, size, mtime in files:
        try:
            st = os.stat(path)
        except OSError as e:
            raise Unroutable(f"rank {rank} can't read {path}, which the model was loaded from ({e})") from e
        if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (size, mtime):
            raise Unroutable(f"rank {rank} sees another file at {path} than ComfyUI's process does")


def _node_class(call: NodeCall):
    import importlib

    import nodes

    module = sys.modules.get(call.module)
    if module is None and call.package is not None:
        # NOTE: runs the package's __init__ in this rank as ComfyUI does at start-up (its own imports too)
        ok = complete(nodes.load_custom_node(call.package, module_parent=call.parent))
        module = sys.modules.get(call.module)
        if not ok or module is None:
            raise RuntimeError(f"loading the custom node {call.package} did not define {call.module}")
    if module is None:
        module = importlib.import_module(call.module)
    cls = module
    for part in call.qualname.split("."):
        cls = getattr(cls, part)
    return cls


def replay(call: NodeCall, disable_dynamic: bool = False):
    """On a rank: run the recorded loader node; its MODEL output. (`disable_dynamic` is the recipe
    protocol's; a node decides its patcher class itself.) A node this rank can't import or run makes
    the model unroutable (it runs in ComfyUI's process), not the group broken."""
    try:
        return _replay(call)
    except Exception as e:
        log.warning("comfy_xdit_patch: replaying %s failed:\n%s", call.qualname, traceback.format_exc())
        raise Unroutable(f"a rank could not replay the loader node {call.qualname} ({type(e).__name__}: {e})") from e


def _replay(call: NodeCall):
    import execution
    import folder_paths

    cls = _node_class(call)
    # the package's import may register folders; ComfyUI's process's view of them wins
    folder_paths.folder_names_and_paths.update(copy.deepcopy(call.folders))
    obj = cls()  # as ComfyUI's executor makes a node object, classic or V3
    output, _, _, pending = complete(
        execution.get_output_data(None, "comfy_xdit_replay", obj, call.inputs, v3_data=call.v3_data))
    if pending:
        raise RuntimeError("it returned before its model was loaded (an async node)")
    return output[call.output][0]
