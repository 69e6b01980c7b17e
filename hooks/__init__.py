"""ComfyUI-facing entry points of comfy_xdit_patch (the plugin code itself is the comfy_xdit_patch package)."""
