"""The Wan family (comfy.ldm.wan.model:WanModel): Wan 2.1 T2V / I2V / FLF2V, Wan 2.2 A14B experts and TI2V-5B.

Wan patch-embeds the video inside `forward_orig`, so no method receives its tokens: the sequence is split
where the block list is entered, through ComfyUI's block-replace seam (every block's replace gets this
rank's video tokens, RoPE freqs and modulation rows; the last gathers the video tokens before the head).
Everything before the blocks is per token or whole (patch embedding, RoPE, time and text embeddings), and
so is the head, so the split is exact. TI2V-5B's image-to-video gives each latent frame its own timestep:
the modulation rows are then one per frame, and each token gets its frame's row as ComfyUI's `repeat_e`
deals them out. Cross-attention to the text (and CLIP-image) tokens keeps its keys whole: each rank's
video queries attend all of them with ComfyUI's own attention.
"""
from .plan import BlockSeam, Plan

WAN = Plan(
    family="wan",
    name="Wan",
    model_class="comfy.ldm.wan.model:WanModel",  # exactly: VACE, camera, S2V, ... are subclasses, not routed
    heads_attr="num_heads",
    seam=BlockSeam(blocks="blocks", tokens=("img", "pe"), modulation=("vec",),
                   repeat="comfy.ldm.wan.model:repeat_e"),
    whole_keys=("cross_attn",),
    static=("context", "clip_fea", "time_dim_concat"),
    blocks=("blocks",),
)

PLANS = (WAN,)
