"""A node pack used only by the demo and the tests (linked into their own ComfyUI base directory).

T5-XXL can't be shipped or made tiny, so this node stands in for CLIPTextEncode: it returns
FLUX-shaped conditioning (T5 tokens + pooled CLIP vector + guidance) drawn from a seed.
The plugin itself registers no nodes.
"""
import torch


class XDitDemoConditioning:
    CATEGORY = "testing/comfy_xdit_patch"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            "tokens": ("INT", {"default": 512, "min": 1, "max": 4096}),
            "dim": ("INT", {"default": 4096, "min": 1, "max": 8192}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0}),
        }}

    def make(self, seed, tokens, dim, guidance=3.5):
        g = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, dim, generator=g)
        pooled = torch.randn(1, 768, generator=g)
        return ([[context, {"pooled_output": pooled, "guidance": guidance}]],)


NODE_CLASS_MAPPINGS = {"XDitDemoConditioning": XDitDemoConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"XDitDemoConditioning": "FLUX test conditioning (comfy_xdit_patch demo)"}
