"""comfy_xdit_patch: FLUX in ComfyUI on several GPUs (Ray workers, sequence-parallel attention)."""
__version__ = "0.1.0"
