"""Where ComfyUI is: COMFYUI_PATH, else the ComfyUI whose custom_nodes holds this checkout, else ~/ComfyUI.

Standard library only: install.py uses it before any dependency is installed.
"""
from __future__ import annotations

import os
import sys

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOW_TO_GET = (
    "ComfyUI was not found. Set COMFYUI_PATH to a ComfyUI checkout, install this plugin inside "
    "ComfyUI/custom_nodes/, or put ComfyUI at ~/ComfyUI, e.g.: "
    "git clone https://github.com/comfyanonymous/ComfyUI ~/ComfyUI"
)


def is_comfyui(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "comfy", "model_management.py")) and os.path.isfile(
        os.path.join(path, "main.py"))


def find_comfyui() -> str | None:
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(os.environ["COMFYUI_PATH"])
    parent = os.path.dirname(os.path.realpath(CHECKOUT))
    while parent != os.path.dirname(parent):
        candidates.append(parent)
        parent = os.path.dirname(parent)
    candidates.append(os.path.expanduser("~/ComfyUI"))
    for c in candidates:
        if is_comfyui(c):
            return os.path.abspath(c)
    return None


def import_comfy(cpu: bool | None = None) -> str:
    """Put ComfyUI on sys.path (CPU mode when no GPU is usable) and return its folder."""
    root = find_comfyui()
    if root is None:
        raise SystemExit(HOW_TO_GET)
    if root not in sys.path:
        sys.path.insert(0, root)
    if CHECKOUT not in sys.path:
        sys.path.insert(0, CHECKOUT)
    import comfy.options  # noqa: F401

    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    if cpu:
        from comfy.cli_args import args

        args.cpu = True
    return root


def find_comfyui_gguf() -> str | None:
    """city96's ComfyUI-GGUF: COMFYUI_GGUF_PATH, else ComfyUI/custom_nodes/ComfyUI-GGUF."""
    root = find_comfyui()
    for path in (os.environ.get("COMFYUI_GGUF_PATH"), root and os.path.join(root, "custom_nodes", "ComfyUI-GGUF")):
        if path and os.path.isfile(os.path.join(path, "nodes.py")):
            return os.path.abspath(path)
    return None
