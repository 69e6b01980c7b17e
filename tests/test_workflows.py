"""Stock community workflows, unchanged, routed vs ComfyUI alone (fp32, max |delta| <= 1e-4 on the final
latent), with the workers' counters proving the routed run used them."""
import logging
import os

import comfy.sd
import comfy.utils
import folder_paths
import nodes
import pytest
import torch
from comfy_extras import nodes_custom_sampler as ncs
from comfy_extras import nodes_edit_model, nodes_flux, nodes_model_advanced

import tiny
from comfy_xdit_patch.tools import synthetic
from conftest import TOL, ksample, node, sample


@pytest.fixture
def flux(load_flux, tiny_flux):
    return load_flux(tiny_flux)


@pytest.fixture
def loras(tmp_path, tiny_flux):
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    sd = comfy.utils.load_torch_file(tiny_flux)
    for name, seed in (("a", 1), ("b", 2)):
        synthetic.save(synthetic.lora(sd, rank=4, seed=seed, scale=0.1), str(tmp_path / f"tiny_{name}.safetensors"))
    return "tiny_a.safetensors", "tiny_b.safetensors"


def run(model, latent=None, cfg=1.0, pos=None, neg=None, **kw):
    return ksample(model, pos or tiny.conditioning(1), neg or tiny.conditioning(2), latent or tiny.latent(64, 48),
                   cfg=cfg, **kw)


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_lora_model_only(compare, flux, loras, strength):
    (model,) = node(nodes.LoraLoaderModelOnly, model=flux, lora_name=loras[0], strength_model=strength)
    compare(lambda: run(model))


def test_lora_loader_and_switching_resyncs_the_workers(compare, flux, loras):
    (a, _) = node(nodes.LoraLoader, model=flux, clip=None, lora_name=loras[0], strength_model=0.8, strength_clip=0)
    (b, _) = node(nodes.LoraLoader, model=flux, clip=None, lora_name=loras[1], strength_model=0.8, strength_clip=0)
    out_a, _, _ = compare(lambda: run(a))
    out_b, _, _ = compare(lambda: run(b))  # the ranks must not keep A's weights
    out_plain, _, _ = compare(lambda: run(flux))  # nor any LoRA at all
    assert (out_a - out_b).abs().max() > 1e-3 and (out_a - out_plain).abs().max() > 1e-3


def test_model_sampling_flux_shift(compare, flux):
    (model,) = node(nodes_model_advanced.ModelSamplingFlux, model=flux, max_shift=1.15, base_shift=0.5,
                    width=64, height=48)
    compare(lambda: run(model))


@pytest.mark.parametrize("guidance", [1.5, None], ids=["FluxGuidance", "FluxDisableGuidance"])
def test_flux_guidance_nodes(compare, flux, guidance):
    pos = tiny.conditioning(1)
    if guidance is None:
        (pos,) = node(nodes_flux.FluxDisableGuidance, conditioning=pos)
    else:
        (pos,) = node(nodes_flux.FluxGuidance, conditioning=pos, guidance=guidance)
    compare(lambda: run(flux, pos=pos))


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_ksampler_samplers(compare, flux, sampler):
    compare(lambda: run(flux, sampler=sampler, steps=4))  # ancestral: same seed, same noise


@pytest.mark.parametrize("guider", ["BasicGuider", "CFGGuider"])
def test_sampler_custom_advanced(compare, flux, guider):
    def go():
        (noise,) = node(ncs.RandomNoise, noise_seed=11)
        if guider == "BasicGuider":
            (g,) = node(ncs.BasicGuider, model=flux, conditioning=tiny.conditioning(1))
        else:
            (g,) = node(ncs.CFGGuider, model=flux, positive=tiny.conditioning(1), negative=tiny.conditioning(2), cfg=2.5)
        (sampler,) = node(ncs.KSamplerSelect, sampler_name="euler")
        (sigmas,) = node(ncs.BasicScheduler, model=flux, scheduler="simple", steps=3, denoise=1.0)
        out, _ = node(ncs.SamplerCustomAdvanced, noise=noise, guider=g, sampler=sampler, sigmas=sigmas,
                      latent_image=tiny.latent(64, 48))
        return out["samples"]

    compare(go)


def test_progress_and_previews_update_every_step(router, flux, monkeypatch):
    from comfy.cli_args import LatentPreviewMethod, args

    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, preview)))
    try:
        before = router.stats["routed_calls"]
        run(flux, steps=5)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert router.stats["routed_calls"] - before == 5
    assert [v for v, _ in seen] == [1, 2, 3, 4, 5] and all(p is not None for _, p in seen)  # a preview each step


@pytest.mark.parametrize("cfg,batch,layout", [(3.5, 1, "cfg=2,ulysses=1,ring=1"), (1.0, 2, "cfg=2,ulysses=1,ring=1"),
                                              (3.5, 3, "cfg=2,ulysses=1,ring=1"), (1.0, 1, "cfg=1,ulysses=2,ring=1")])
def test_cfg_and_batch_parallel(compare, router, flux, cfg, batch, layout):
    """Auto layout on 2 ranks: a batch of 2 or more (cond + uncond at CFG > 1, or a latent batch) is
    shared by 2 CFG groups; CFG 1 with one image is sequence parallelism."""
    before = router.stats[f"layout {layout}"]
    _, _, calls = compare(lambda: run(flux, latent=tiny.latent(64, 48, batch=batch), cfg=cfg))
    assert router.stats[f"layout {layout}"] - before == calls


@pytest.mark.slow  # ~30 s: a 4-rank group of its own
def test_four_ranks_cfg_times_ulysses(config, router, flux_file, load_flux):
    """4 ranks at CFG 3.5: cond and uncond on two pairs of ranks, each pair sequence-parallel."""
    import dataclasses

    from comfy_xdit_patch.driver import patch

    model = load_flux(flux_file(heads=4, seed=5))
    with_plugin = lambda: run(model, cfg=3.5)  # noqa: E731
    patch.uninstall()  # this machine's CPUs host one group at a time
    try:
        reference = with_plugin()
        four = patch.install(dataclasses.replace(config, workers=4))
        routed = with_plugin()
        assert four.stats["layout cfg=2,ulysses=2,ring=1"] == 3
        assert [s["calls"] for s in four.group.stats()] == [3] * 4
        assert (routed - reference).abs().max().item() <= 1e-4
    finally:
        patch.uninstall()
        patch.install(config, router=router)


def test_tuned_exchange_schedules_route_exactly(compare, router, flux_file, load_flux, monkeypatch):
    """The tuner as on GPUs (COMFY_XDIT_A2A_CHUNKS=auto): 8 heads, 4 per rank, so it tries 1 and 2 equal pieces
    and the tapered (1, 2, 1) on the first calls, each sent with its call to the ranks; every step equal."""
    from comfy_xdit_patch.driver.tuning import ChunkTuner

    model = load_flux(flux_file(heads=8, seed=6))
    tuner, tried = ChunkTuner(None), []
    record = tuner.record
    monkeypatch.setattr(tuner, "record", lambda key, chunks, seconds: (tried.append(chunks), record(key, chunks, seconds)))
    monkeypatch.setattr(router, "tuner", tuner)
    compare(lambda: run(model, steps=10))
    assert tried[:9] == [1] * 3 + [2] * 3 + [(1, 2, 1)] * 3 and len(tuner.best) == 1


def test_impossible_forced_layout_is_refused_before_sampling(router, flux, monkeypatch, caplog):
    import dataclasses

    from comfy_xdit_patch.config import Mesh
    from comfy_xdit_patch.errors import LayoutError

    steps = []
    cb = lambda *a: steps.append(a)  # noqa: E731
    monkeypatch.setattr(router, "config", dataclasses.replace(router.config, parallel=Mesh(ring=2), fallback="error"))
    with pytest.raises(LayoutError, match="ring > 1"):
        sample(flux, tiny.conditioning(1), tiny.conditioning(2), tiny.latent(64, 48), steps=2, callback=cb)
    assert steps == []  # refused before the first step
    monkeypatch.setattr(router, "config", dataclasses.replace(router.config, fallback="local"))
    before = router.stats["routed_calls"]
    with caplog.at_level(logging.INFO, logger="comfy_xdit_patch"):
        sample(flux, tiny.conditioning(1), tiny.conditioning(2), tiny.latent(64, 48), steps=2, callback=cb)
    assert router.stats["routed_calls"] == before and "ring > 1" in caplog.text


# --- inputs the ranks can't take run in ComfyUI's process, logged once per model ----------------------

def _nudge_q(q, k, v, pe=None, attn_mask=None, extra_options=None):
    return {"q": q * 1.01}


def _replace_block(args, extra):
    out = extra["original_block"](args)
    return {"img": out["img"] * 0.99, "txt": out["txt"]}


@pytest.mark.parametrize("patch_kind", ["attn1_patch", "patches_replace"])
def test_other_nodes_transformer_patches_run_locally(compare, router, flux, patch_kind, caplog):
    model = flux.clone()
    if patch_kind == "attn1_patch":
        model.set_model_attn1_patch(_nudge_q)
    else:
        model.set_model_patch_replace(_replace_block, "dit", "double_block", 0)
    with caplog.at_level(logging.INFO, logger="comfy_xdit_patch"):
        patched, _, _ = compare(lambda: run(model), expect_routed=False)
        compare(lambda: run(model), expect_routed=False)
    plain, _, _ = compare(lambda: run(flux))
    assert (patched - plain).abs().max() > 1e-4  # the patch did act, locally
    lines = [r for r in caplog.records if "transformer_options" in r.getMessage()]
    assert len(lines) == 1  # once per model


def test_attention_mask_runs_locally(compare, flux):
    pos = tiny.conditioning(1)
    tokens = 8 + (64 // 16) * (48 // 16)
    mask = torch.zeros(1, tokens, tokens)
    mask[:, :, :4] = -1e4  # keep everyone off the first 4 text tokens
    pos = [[pos[0][0], dict(pos[0][1], attention_mask=mask, attention_mask_img_shape=(4, 3))]]
    masked, _, _ = compare(lambda: run(flux, pos=pos), expect_routed=False)
    plain, _, _ = compare(lambda: run(flux))
    assert (masked - plain).abs().max() > 1e-4



@pytest.mark.slow  # ~50 s: a group of its own, CPU inductor
def test_compiled_blocks_on_the_ranks_with_and_without_lora(router, flux, loras):
    """COMFY_XDIT_COMPILE=1 (the default on GPU ranks) through a worker group of its own: the compiled
    blocks match ComfyUI alone, also after a LoRA patches the weights under them."""
    import dataclasses

    from comfy_xdit_patch.driver import patch

    (lora,) = node(nodes.LoraLoaderModelOnly, model=flux, lora_name=loras[0], strength_model=1.0)
    blocks = len(flux.model.diffusion_model.double_blocks) + len(flux.model.diffusion_model.single_blocks)
    session = patch.uninstall()  # its group's CPUs go to a group of compiling ranks; it restarts on next use
    try:
        reference = [run(m, steps=2) for m in (flux, lora)]
        # NOTE: the first call compiles on 2 CPU cores: give it time (the default timeout is 120 s)
        compiling = patch.install(dataclasses.replace(session.config, compile=True, timeout=600))
        routed = [run(m, steps=2) for m in (flux, lora)]
        stats = compiling.group.stats()
    finally:
        patch.uninstall()
        patch.install(session.config, router=session)
    assert compiling.stats["routed_calls"] == 4 and not compiling.disabled
    assert [s["compiled_blocks"] for s in stats] == [blocks] * 2
    for got, want in zip(routed, reference):
        assert (got - want).abs().max().item() <= TOL
    assert (reference[0] - reference[1]).abs().max().item() > 100 * TOL  # the LoRA changes the image

# --- coexistence ------------------------------------------------------------------------------------

def test_steps_aside_for_core_multigpu_cfg_split(compare, flux):
    model = flux.clone()
    model.set_additional_models("multigpu", [flux.deepclone_multigpu(new_load_device=torch.device("cpu"))])
    compare(lambda: run(model, cfg=3.5), expect_routed=False)


def test_easycache(compare, flux):
    from comfy_extras import nodes_easycache

    (model,) = node(nodes_easycache.EasyCacheNode, model=flux, reuse_threshold=0.5, start_percent=0.1,
                    end_percent=0.95, verbose=False)
    compare(lambda: run(model, steps=8))


def test_two_models_switch_and_the_rank_cache_evicts(compare, router, load_flux, tiny_flux, flux_file):
    a, b = load_flux(tiny_flux), load_flux(flux_file(seed=7))
    for model in (a, b, a):
        compare(lambda: run(model))
        stats = router.group.stats()
        assert all(len(s["models"]) == 1 for s in stats)  # COMFY_XDIT_MODEL_CACHE=1: one base model held
    assert stats[0]["loads"] >= 3


# --- FLUX family members and model-side features ---------------------------------------------------

def test_controlnet(compare, flux, tmp_path):
    folder_paths.add_model_folder_path("controlnet", str(tmp_path))
    synthetic.save(synthetic.tiny_controlnet(), str(tmp_path / "tiny_cn.safetensors"))
    (cn,) = node(nodes.ControlNetLoader, control_net_name="tiny_cn.safetensors")
    image = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(4))
    pos, neg = node(nodes.ControlNetApplyAdvanced, positive=tiny.conditioning(1), negative=tiny.conditioning(2),
                    control_net=cn, image=image, strength=0.8, start_percent=0.0, end_percent=1.0)
    with_cn, _, _ = compare(lambda: run(flux, pos=pos, neg=neg, latent=tiny.latent(48, 64)))
    plain, _, _ = compare(lambda: run(flux, latent=tiny.latent(48, 64)))
    assert (with_cn - plain).abs().max() > 1e-4  # the residuals did reach the tokens


@pytest.mark.parametrize("method", ["offset", "index"])
def test_kontext_reference_latents(compare, flux, method):
    ref = {"samples": torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(9))}  # 32x48 vs 64x48
    (pos,) = node(nodes_edit_model.ReferenceLatent, conditioning=tiny.conditioning(1), latent=ref)
    (pos,) = node(nodes_flux.FluxKontextMultiReferenceLatentMethod, conditioning=pos, reference_latents_method=method)
    compare(lambda: run(flux, pos=pos))


def test_flux_fill_inpainting(compare, flux_file, load_flux):
    model = load_flux(flux_file(in_channels=96))  # FLUX Fill: latent + masked image + mask
    vae = comfy.sd.VAE(sd=synthetic.taesd_vae(16))
    pixels = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 48, 64)
    mask[:, 8:40, 16:48] = 1
    pos, neg, latent = node(nodes.InpaintModelConditioning, positive=tiny.conditioning(1),
                            negative=tiny.conditioning(2), vae=vae, pixels=pixels, mask=mask, noise_mask=True)
    compare(lambda: run(model, pos=pos, neg=neg, latent=latent))


def test_flux_schnell_no_guidance(compare, flux_file, load_flux):
    model = load_flux(flux_file(guidance_embed=False))
    assert not model.model.diffusion_model.params.guidance_embed
    compare(lambda: run(model, pos=tiny.conditioning(1, guidance=None), neg=tiny.conditioning(2, guidance=None)))


@pytest.mark.slow  # ~40 s: another model family loaded on the ranks
def test_chroma_with_cfg(compare, models_dir):
    path = os.path.join(models_dir, "tiny_chroma.safetensors")
    if not os.path.exists(path):
        synthetic.save(synthetic.tiny_chroma(), path)
    model = comfy.sd.load_diffusion_model(path)
    assert type(model.model.diffusion_model).__module__ == "comfy.ldm.chroma.model"
    pos, neg = tiny.conditioning(1, guidance=None), tiny.conditioning(2, guidance=None)
    compare(lambda: ksample(model, pos, neg, tiny.latent(32, 32), steps=2, cfg=3.5))


def test_a_routed_run_makes_room_as_comfyui_would(compare, flux, monkeypatch, tmp_path):
    """ComfyUI alone frees its GPU for the model it loads (its text encoder leaves a small card); routed, a rank on
    that GPU loads it, so ComfyUI's process frees the same room first. Here, on the CPU, ComfyUI's own reserve
    (--reserve-vram) leaves no room: another model loaded there goes."""
    path = synthetic.save(synthetic.kl_vae(seed=1), str(tmp_path / "other.safetensors"))
    other = comfy.sd.VAE(sd=comfy.utils.load_torch_file(path)).patcher  # stands for the text encoder

    def routed_run():
        comfy.model_management.load_models_gpu([other])
        compare(lambda: run(flux))
        return other in comfy.model_management.loaded_models()

    assert routed_run(), "with room, the other model stays loaded"
    monkeypatch.setattr(comfy.model_management, "EXTRA_RESERVED_VRAM", 1 << 50)
    assert not routed_run(), "without room, ComfyUI's process unloads it for the rank"
