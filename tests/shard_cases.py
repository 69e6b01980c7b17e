"""What the weight-sharing tests share: the shard a rank may hold, the loaders' tensor kinds, one model call."""
import torch

import flux2_cases

BLOCKS = ("double_blocks", "single_blocks")
SLACK = 12 * 2**20  # host memory that moves under a load besides the weights (ComfyUI's objects, the allocator)


def assert_share(weights: dict, world: int, setting: str = "on") -> None:
    """A rank holds 1/N of its blocks' bytes between calls, and 1/N + two blocks' worth at most while computing
    (with the setting off: all of them, unsharded)."""
    if setting == "off":
        assert not weights["sharded"] and weights["resident_bytes"] == weights["block_bytes"] > 0, weights
        return
    assert weights["sharded"] and weights["world"] == world, weights
    pad = 16 * world  # each block's bytes are padded to a multiple of 16 x N (rank/weights.py ALIGN)
    share = weights["block_bytes"] / world + pad * weights["blocks"]
    assert weights["resident_bytes"] == weights["shard_bytes"] <= share, weights  # nothing else held of the blocks
    assert weights["peak_bytes"] <= share + 2 * (weights["largest_block"] + pad), weights


def load_as(kind, path, folder, gguf_path):
    """The model file as `kind`'s loader makes it: default, fp8_e4m3fn (weight dtype), fp8mixed, Q8_0 / Q4_K (GGUF)."""
    import asyncio

    import comfy.sd
    import folder_paths
    import nodes

    if kind in ("Q8_0", "Q4_K"):
        if "UnetLoaderGGUF" not in nodes.NODE_CLASS_MAPPINGS:
            assert asyncio.run(nodes.load_custom_node(gguf_path))
        folder_paths.add_model_folder_path("diffusion_models", folder)
    if kind == "fp8_e4m3fn":
        return comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float8_e4m3fn})
    return flux2_cases.load(kind, path, folder, nodes.NODE_CLASS_MAPPINGS.get("UnetLoaderGGUF")) \
        if kind != "default" else comfy.sd.load_diffusion_model(path)


def run_once(patcher):
    """One model call on fixed inputs (FLUX.2's or Wan's shapes)."""
    g = torch.Generator().manual_seed(0)
    if type(patcher.model).__name__.startswith("WAN"):  # 16 latent channels, 3 frames; umT5's 4096-wide text
        x, ctx = torch.randn(1, 16, 3, 4, 6, generator=g), torch.randn(1, 8, 4096, generator=g)
        return patcher.model.apply_model(x, torch.tensor([0.5]), c_crossattn=ctx)
    x, ctx = torch.randn(1, 128, 3, 4, generator=g), torch.randn(1, 16, 32, generator=g)
    return patcher.model.apply_model(x, torch.tensor([0.5]), c_crossattn=ctx, guidance=torch.tensor([3.5]))
