"""Which VAEs the ranks decode in parallel, split by rows (rank/vae.py): ComfyUI's first-stage models whose
`decode` is their decoder plus per-position work (1x1 convolutions, a latent batch norm, unpatchify), and whose
decoder's modules the row split keeps exact. Both processes read it: ComfyUI's side to route a decode, a rank
to check the VAE it built. Imports no torch.
"""
from __future__ import annotations

# first-stage model class -> (its decoder's class, the name the logs use)
VAES = {
    "comfy.ldm.models.autoencoder:AutoencodingEngine": ("comfy.ldm.modules.diffusionmodules.model:Decoder", "KL"),
    "comfy.ldm.models.autoencoder:AutoencoderKL": ("comfy.ldm.modules.diffusionmodules.model:Decoder", "KL"),
    "comfy.ldm.wan.vae:WanVAE": ("comfy.ldm.wan.vae:Decoder3d", "Wan 2.1"),
    "comfy.ldm.wan.vae2_2:WanVAE": ("comfy.ldm.wan.vae2_2:Decoder3d", "Wan 2.2"),
}


def _name(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def vae_kind(first_stage_model) -> str | None:
    """The name of a first-stage model the ranks can decode by rows (its class and its decoder's, exactly:
    a subclass may decode otherwise); None for any other."""
    entry = VAES.get(_name(first_stage_model))
    decoder = getattr(first_stage_model, "decoder", None)
    if entry is None or decoder is None or _name(decoder) != entry[0]:
        return None
    return entry[1]
