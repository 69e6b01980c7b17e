"""comfy_xdit_patch as a ComfyUI custom node: no nodes, only a start-up hook (see hooks/custom_node.py)."""
from .hooks.custom_node import on_load

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

on_load()
