"""The FLUX family: FLUX.1 dev / schnell / Fill / Kontext and FLUX.2 [dev] / [klein] (comfy.ldm.flux: one class;
FLUX.2 adds 4-axis RoPE ids and `index` reference latents, made per token before the entry, and modulation
shared by all blocks, made from the timestep vector that every rank holds whole) and Chroma (comfy.ldm.chroma).

Both enter their token sequence in `forward_orig(img, img_ids, txt, txt_ids, ...)`: everything before
it is per-token (patchify, img_in, txt_in, RoPE ids), so splitting its inputs is exact, and its output
is the image tokens (reference tokens included), gathered back in order.
"""
from .plan import Plan

_COMMON = dict(
    entry="forward_orig",
    txt=("txt", "txt_ids"),
    img=("img", "img_ids"),
    control="control",
    heads_attr="num_heads",
    static=("context", "y", "ref_latents"),
    blocks=("double_blocks", "single_blocks"),
)

FLUX = Plan(
    family="flux",
    name="FLUX",
    model_class="comfy.ldm.flux.model:Flux",
    refuse=(
        ("attention_mask", None, "attention masks"),
        # NOTE: this method modulates reference tokens with a second timestep, by token index
        ("ref_latents_method", "index_timestep_zero", "reference latents with index_timestep_zero"),
    ),
    defaults=(("ref_latents_method", "params.default_ref_method"),),
    entry_none=("attn_mask", "timestep_zero_index"),
    **_COMMON,
)

CHROMA = Plan(
    family="chroma",
    name="Chroma",
    model_class="comfy.ldm.chroma.model:Chroma",
    refuse=(("attention_mask", None, "attention masks"),),
    entry_none=("attn_mask",),
    **_COMMON,
)

PLANS = (FLUX, CHROMA)
