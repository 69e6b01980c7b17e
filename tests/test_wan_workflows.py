"""Stock Wan workflows, unchanged, routed vs ComfyUI alone (fp32, max |delta| <= 1e-4 on the final latent): tiny
Wan 2.1 T2V / I2V and Wan 2.2 TI2V-5B / A14B-expert models that ComfyUI detects as such, every model call of
the routed run on the ranks (none left in ComfyUI's process), and the layout each call took."""
import dataclasses
import os

import comfy.sd
import comfy.utils
import folder_paths
import nodes
import pytest
import torch
from comfy_extras import nodes_hunyuan, nodes_model_advanced, nodes_wan

from comfy_xdit_patch.config import Mesh
from comfy_xdit_patch.tools import synthetic, synthetic_wan
from conftest import ksample, node

SEQ, CFG = "layout cfg=1,ulysses=2,ring=1", "layout cfg=2,ulysses=1,ring=1"


@pytest.fixture(scope="session")
def wan_file(models_dir):
    """wan_file(layout, seed) -> path of a tiny Wan model (synthetic_wan.LAYOUTS), made once per session."""
    made = {}

    def make(layout="2.1-t2v", seed=0):
        if (layout, seed) not in made:
            path = os.path.join(models_dir, f"wan_{layout}_{seed}.safetensors")
            made[layout, seed] = synthetic.save(synthetic_wan.tiny_wan(layout, seed=seed), path)
        return made[layout, seed]

    return make


@pytest.fixture
def routed_all(compare, router):
    """compare(fn) that also holds every model call of the routed run to the ranks; returns (routed, calls,
    the layouts the calls took)."""

    def run(fn):
        before = dict(router.stats)
        routed, _, calls = compare(fn)
        after = router.stats
        assert (after["local_calls"], after["fallbacks"]) == (before.get("local_calls", 0), before.get("fallbacks", 0))
        layouts = {k: after[k] - before.get(k, 0) for k in after if k.startswith("layout ") and after[k] != before.get(k, 0)}
        return routed, calls, layouts

    return run


def text(seed: int, tokens: int = 12):
    """umT5-shaped conditioning (the text encoder can't be made tiny)."""
    return [[torch.randn(1, tokens, synthetic_wan.TEXT_DIM, generator=torch.Generator().manual_seed(seed)), {}]]


def video_latent(width=80, height=48, length=17, batch=1):
    """EmptyHunyuanLatentVideo, as Wan 2.1 workflows use it: 80x48, 17 frames -> 5 x 6 x 10 latent, 75 tokens."""
    (latent,) = node(nodes_hunyuan.EmptyHunyuanLatentVideo, width=width, height=height, length=length, batch_size=batch)
    return latent


def load(path):
    return comfy.sd.load_diffusion_model(path)


@pytest.mark.parametrize("cfg,forced,layout", [(1.0, None, SEQ), (5.0, None, CFG), (5.0, Mesh(ulysses=2), SEQ)],
                         ids=["cfg1-sequence", "cfg5-cfg-split", "cfg5-sequence"])
def test_text_to_video(routed_all, router, wan_file, monkeypatch, cfg, forced, layout):
    """Wan 2.1 T2V through KSampler with ModelSamplingSD3 (shift 8, as Wan's workflows): an odd token count
    (filler on the last rank); CFG > 1 shares cond and uncond out, or (forced) splits the sequence of both."""
    if forced is not None:
        monkeypatch.setattr(router, "config", dataclasses.replace(router.config, parallel=forced))
    model = load(wan_file("2.1-t2v"))
    assert type(model.model.model_config).__name__ == "WAN21_T2V"
    (model,) = node(nodes_model_advanced.ModelSamplingSD3, model=model, shift=8.0)
    _, calls, layouts = routed_all(lambda: ksample(model, text(1), text(2), video_latent(), steps=3, cfg=cfg))
    assert calls == 3 and layouts == {layout: 3}


def test_lora(routed_all, wan_file, tmp_path):
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    path = wan_file("2.1-t2v")
    lora = synthetic.lora(comfy.utils.load_torch_file(path), rank=4, seed=1, scale=0.1,
                          targets=synthetic_wan.LORA_TARGETS)
    synthetic.save(lora, str(tmp_path / "wan_lora.safetensors"))
    model = load(path)
    (with_lora,) = node(nodes.LoraLoaderModelOnly, model=model, lora_name="wan_lora.safetensors", strength_model=1.0)
    out_lora, _, _ = routed_all(lambda: ksample(with_lora, text(1), text(2), video_latent(), steps=2))
    out_plain, _, _ = routed_all(lambda: ksample(model, text(1), text(2), video_latent(), steps=2))
    assert (out_lora - out_plain).abs().max() > 1e-3  # the ranks applied the LoRA, and dropped it again


@pytest.mark.parametrize("layout", ["2.1-i2v", "2.2-a14b-i2v"])
def test_image_to_video(routed_all, router, wan_file, monkeypatch, layout):
    """WanImageToVideo (start image through a tiny Wan VAE; Wan 2.1 I2V also with a CLIP-vision output), CFG 3.5
    with the sequence split: the video queries attend the CLIP-image and text tokens whole."""
    import comfy.clip_vision

    monkeypatch.setattr(router, "config", dataclasses.replace(router.config, parallel=Mesh(ulysses=2)))
    model = load(wan_file(layout))
    vae = comfy.sd.VAE(sd=synthetic_wan.tiny_wan_vae())
    clip_vision = None
    if layout == "2.1-i2v":
        assert type(model.model.model_config).__name__ == "WAN21_I2V"
        clip_vision = comfy.clip_vision.Output()
        clip_vision.penultimate_hidden_states = torch.randn(1, 257, synthetic_wan.CLIP_DIM,
                                                            generator=torch.Generator().manual_seed(5))
    image = torch.rand(1, 48, 80, 3, generator=torch.Generator().manual_seed(6))
    pos, neg, latent = node(nodes_wan.WanImageToVideo, positive=text(1), negative=text(2), vae=vae, width=80,
                            height=48, length=17, batch_size=1, start_image=image, clip_vision_output=clip_vision)
    _, calls, layouts = routed_all(lambda: ksample(model, pos, neg, latent, steps=2, cfg=3.5))
    assert layouts == {SEQ: calls}


class _StandInVae22:
    """Wan22ImageToVideoLatent encodes the start image with the Wan 2.2 VAE, whose size ComfyUI fixes (dim 160):
    this stands in for its encoder with a fixed latent (the node's mask and the model's per-frame timesteps
    are what is under test)."""

    def encode(self, image):
        _, h, w, _ = image.shape
        return torch.randn(1, 48, 1, h // 16, w // 16, generator=torch.Generator().manual_seed(8))


@pytest.mark.parametrize("start_image", [False, True], ids=["text-to-video", "image-to-video"])
def test_ti2v_5b(routed_all, router, wan_file, start_image):
    """Wan 2.2 TI2V-5B (48-channel latents): with a start image the noise mask gives each latent frame its own
    timestep, so each rank's tokens take their frames' modulation rows."""
    model = load(wan_file("2.2-ti2v-5b"))
    assert type(model.model).__name__ == "WAN22"
    image = torch.rand(1, 96, 112, 3, generator=torch.Generator().manual_seed(6)) if start_image else None
    (latent,) = node(nodes_wan.Wan22ImageToVideoLatent, vae=_StandInVae22(), width=112, height=96, length=13,
                     batch_size=1, start_image=image)  # 4 x 6 x 7 latent: 42 tokens, 21 a rank
    assert ("noise_mask" in latent) == start_image
    _, calls, layouts = routed_all(lambda: ksample(model, text(1), text(2), latent, steps=3))
    assert calls == 3 and layouts == {SEQ: 3}
    assert router.last_run["size"] == "112x96, 13 frames"  # 16 pixels a latent cell (Wan 2.2's VAE), not 8


def two_passes(high, low, pos, neg):
    """Wan 2.2 A14B's setup: the high-noise expert denoises the first steps and hands its leftover noise to
    the low-noise expert (two KSamplerAdvanced), CFG 3.5."""
    common = dict(noise_seed=4, steps=4, cfg=3.5, sampler_name="euler", scheduler="simple", positive=pos,
                  negative=neg)
    (mid,) = node(nodes.KSamplerAdvanced, model=high, add_noise="enable", latent_image=video_latent(),
                  start_at_step=0, end_at_step=2, return_with_leftover_noise="enable", **common)
    (out,) = node(nodes.KSamplerAdvanced, model=low, add_noise="disable", latent_image=mid,
                  start_at_step=2, end_at_step=4, return_with_leftover_noise="disable", **common)
    return out["samples"]


def test_wan22_two_experts_in_two_ksampler_advanced_passes(routed_all, wan_file):
    high, low = load(wan_file("2.2-a14b-t2v", seed=1)), load(wan_file("2.2-a14b-t2v", seed=2))
    _, calls, layouts = routed_all(lambda: two_passes(high, low, text(1), text(2)))
    assert calls == 4 and layouts == {CFG: 4}  # both passes routed


@pytest.mark.slow  # a group of its own (and the session's group restarts after it)
def test_wan22_experts_switch_without_reloading_when_both_fit(config, router, wan_file):
    """COMFY_XDIT_MODEL_CACHE=2: each rank keeps both experts loaded; a second two-pass run loads nothing."""
    from comfy_xdit_patch.driver import patch

    high, low = load(wan_file("2.2-a14b-t2v", seed=1)), load(wan_file("2.2-a14b-t2v", seed=2))
    pos, neg = text(1), text(2)
    patch.uninstall()  # this machine's CPUs host one group at a time
    try:
        reference = two_passes(high, low, pos, neg)
        both = patch.install(dataclasses.replace(config, model_cache=2))
        first = two_passes(high, low, pos, neg)
        loads = [s["loads"] for s in both.group.stats()]
        again = two_passes(high, low, pos, neg)
        stats = both.group.stats()
    finally:
        patch.uninstall()
        patch.install(config, router=router)
    assert both.stats["routed_calls"] == 8 and both.stats["local_calls"] == 0
    assert loads == [2, 2] and [s["loads"] for s in stats] == [2, 2]
    assert all(len(s["models"]) == 2 for s in stats)
    for out in (first, again):
        assert (out - reference).abs().max().item() <= 1e-4
