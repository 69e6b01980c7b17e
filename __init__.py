"""comfy_xdit_patch as a ComfyUI custom node: no nodes, only a start-up hook (see hooks/custom_node.py).

ComfyUI loads a custom-node folder by its path (its module name is the path); the hook then attaches.
Anything else that imports this folder by its name (a test runner or a process it spawns, a tool that
puts custom_nodes/ on sys.path) gets the package itself, comfy_xdit_patch/ beside this file, and
ComfyUI is neither imported nor patched. The hook is loaded by file path rather than by relative
import, so this folder imports the same way whatever its name is.
"""
import importlib.util as _util
import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))

if _os.sep in __name__:  # NOTE: ComfyUI's nodes.load_custom_node names a folder's module by its path
    _spec = _util.spec_from_file_location("comfy_xdit_patch_hooks", _os.path.join(_here, "hooks", "custom_node.py"))
    _hooks = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_hooks)

    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
    if _hooks.on_load(_here) is not _hooks.ANOTHER_COPY:
        WEB_DIRECTORY = "./web"  # the status panel (a sidebar tab): web/xdit_status.js
else:  # imported by name from the folder above: be the runtime package (its submodules come from there)
    __path__ = [_os.path.join(_here, "comfy_xdit_patch")]
    with open(_os.path.join(__path__[0], "__init__.py")) as _f:
        exec(compile(_f.read(), _f.name, "exec"))
