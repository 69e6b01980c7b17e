"""comfy_xdit_patch as a ComfyUI custom node: no nodes, only a start-up hook (see hooks/custom_node.py).

Loaded by file path rather than by relative import, so this folder imports the same way whatever
its name is (ComfyUI, ComfyUI-Manager, a test runner walking the tree).
"""
import importlib.util as _util
import os as _os

_spec = _util.spec_from_file_location(
    "comfy_xdit_patch_hooks", _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "hooks", "custom_node.py"))
_hooks = _util.module_from_spec(_spec)
_spec.loader.exec_module(_hooks)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"  # the status panel (a sidebar tab): web/xdit_status.js

_hooks.on_load()
