"""A rank's side of a model: its files checked against ComfyUI's stamps, then built with ComfyUI's own loader
from the recipe, or by running again the loader node that made it (a NodeCall recorded by driver/models.py):
the package is loaded the way ComfyUI loads custom nodes and the node runs through ComfyUI's own
`get_output_data`.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import os
import stat
import sys
import traceback

from ..errors import Unroutable
from ..wire.spec import ModelSpec, NodeCall

log = logging.getLogger("comfy_xdit_patch.loaders")


def build(spec: ModelSpec):
    """The base model of `spec` (no patches), as ComfyUI's loader makes it."""
    if spec.node is not None:
        return replay(spec.node)
    patcher = spec.recipe[0](*spec.recipe[1], disable_dynamic=True)
    return patcher[spec.recipe[2]] if len(spec.recipe) > 2 else patcher


def missing_files(spec: ModelSpec) -> list[str]:
    """The model's files that are not on this node (checked on each rank before it loads)."""
    return [path for path, *_ in spec.files if not os.path.isfile(path)]


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
        ok = asyncio.run(nodes.load_custom_node(call.package, module_parent=call.parent))
        module = sys.modules.get(call.module)
        if not ok or module is None:
            raise RuntimeError(f"loading the custom node {call.package} did not define {call.module}")
    if module is None:
        module = importlib.import_module(call.module)
    cls = module
    for part in call.qualname.split("."):
        cls = getattr(cls, part)
    return cls


def replay(call: NodeCall):
    """On a rank: run the recorded loader node; its MODEL output. A node this rank can't import or run makes
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
    output, _, _, pending = asyncio.run(
        execution.get_output_data(None, "comfy_xdit_replay", obj, call.inputs, v3_data=call.v3_data))
    if pending:
        raise RuntimeError("it returned before its model was loaded (an async node)")
    return output[call.output][0]
