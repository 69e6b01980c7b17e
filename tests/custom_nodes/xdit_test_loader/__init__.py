"""A custom loader node as third-party packages write them (tests only): it builds the model from a
state dict with its own ops class, so ComfyUI records no recipe for it. Loaded with ComfyUI's
nodes.load_custom_node, in ComfyUI's process and on the ranks alike."""
import comfy.ops
import comfy.sd
import comfy.utils
import folder_paths


class ScaledOutOps(comfy.ops.manual_cast):
    """Linear layers scale their output: a model built with other ops gives another image."""

    class Linear(comfy.ops.manual_cast.Linear):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs) * 1.03125


class TinyLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),)},
                "optional": {"path": ("STRING", {"default": ""}), "options": ("*",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "tests"

    def load(self, unet_name, path="", options=None):
        sd = comfy.utils.load_torch_file(path or folder_paths.get_full_path_or_raise("diffusion_models", unet_name))
        return (comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ScaledOutOps}),)


NODE_CLASS_MAPPINGS = {"XditTestTinyLoader": TinyLoader}
