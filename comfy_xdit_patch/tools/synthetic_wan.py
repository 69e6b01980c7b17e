"""Stand-in Wan weights (comfy.ldm.wan) with real key names, so ComfyUI detects each as what it imitates.

ComfyUI reads a Wan file's shape from its keys (comfy/model_detection.py: `head.modulation`; heads = dim / 128;
in/out channels from `patch_embedding` and `head.head`; `img_emb.*` makes it I2V): a tiny model is a real
WanModel with 128 x heads channels, few blocks and torch's default initialisation (fp32).
"""
from __future__ import annotations

import torch

# layout -> WanModel arguments: Wan 2.1 T2V / I2V (1.3B, 14B: 16-channel latents, I2V adds 20 channels of image
# and mask and CLIP-image cross-attention), Wan 2.2 TI2V-5B (48-channel latents, its own VAE) and one expert of
# Wan 2.2 A14B (T2V: laid out as 2.1 T2V; I2V: 36 input channels, no CLIP image)
LAYOUTS = {
    "2.1-t2v": dict(model_type="t2v", in_dim=16, out_dim=16),
    "2.1-i2v": dict(model_type="i2v", in_dim=36, out_dim=16),
    "2.2-ti2v-5b": dict(model_type="t2v", in_dim=48, out_dim=48),
    "2.2-a14b-t2v": dict(model_type="t2v", in_dim=16, out_dim=16),
    "2.2-a14b-i2v": dict(model_type="t2v", in_dim=36, out_dim=16),
}
TEXT_DIM = 4096  # umT5-XXL; ComfyUI's detection does not read it from the file
CLIP_DIM = 1280  # CLIP-H penultimate hidden states (I2V)


def tiny_wan(layout: str = "2.1-t2v", heads: int = 2, layers: int = 2, ffn_dim: int = 256, seed: int = 0) -> dict:
    """A Wan-shaped state dict small enough for a CPU (`layout`: a key of LAYOUTS)."""
    from comfy.ldm.wan.model import WanModel

    torch.manual_seed(seed)
    model = WanModel(**LAYOUTS[layout], dim=128 * heads, ffn_dim=ffn_dim, num_heads=heads, num_layers=layers,
                     text_dim=TEXT_DIM, operations=torch.nn)
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("modulation"):  # torch.empty in WanModel: ComfyUI leaves it to the file
            t = torch.randn(t.shape) * 0.1
        out[name] = t.detach().contiguous()
    return out


# the layers a Wan LoRA adapts (synthetic.lora's `targets`): attention projections and the feed-forward
LORA_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")


def tiny_wan_vae(dim: int = 8, seed: int = 0) -> dict:
    """A Wan 2.1 VAE (16-channel latents, 8x spatial and 4x temporal compression) with `dim` base channels
    (96 in the released file); comfy.sd.VAE reads dim from `decoder.head.0.gamma`."""
    from comfy.ldm.wan.vae import WanVAE

    torch.manual_seed(seed)
    model = WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                   temperal_downsample=[False, True, True])
    for m in model.modules():  # ComfyUI's layers skip initialisation; torch's own does it
        for base in (torch.nn.Conv3d, torch.nn.Conv2d, torch.nn.Linear):
            if isinstance(m, base):
                base.reset_parameters(m)
                break
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}
