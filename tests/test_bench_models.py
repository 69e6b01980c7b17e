"""`comfy-xdit bench --model`: each model's synthetic weights have its real key names and shapes (built on the meta
device, so the real sizes cost nothing here), ComfyUI's model detection takes them for what they imitate, the tiny
stand-in has the same keys, and the bench's pieces run on each tiny model in this process (ComfyUI alone; the
plugin's runs are test_bench.py's, slow)."""
import re

import pytest
import torch

from comfy_xdit_patch.tools import bench_args, bench_models
from comfy_xdit_patch.tools.bench_models import MODELS

# name -> (ComfyUI's detected config: what must match, billions of parameters)
REAL = {
    "flux1-dev": (dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38, in_channels=16,
                       context_in_dim=4096, vec_in_dim=768, guidance_embed=True), 11.9),
    "flux2-dev": (dict(hidden_size=6144, num_heads=48, depth=8, depth_single_blocks=48, in_channels=128,
                       context_in_dim=15360, guidance_embed=True), 32.2),
    "flux2-klein-4b": (dict(hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20, in_channels=128,
                            context_in_dim=7680, guidance_embed=False), 3.9),
    "wan2.1-14b": (dict(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824, in_dim=16, out_dim=16), 14.3),
    "wan2.2-ti2v-5b": (dict(dim=3072, num_heads=24, num_layers=30, ffn_dim=14336, in_dim=48, out_dim=48), 5.0),
}


def _blockless(keys) -> set:
    return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_shapes_are_detected_as_the_model(name):
    import comfy.model_detection

    model = MODELS[name]
    sd = model.meta_state_dict()
    config = comfy.model_detection.model_config_from_unet(sd, "")
    expected, billions = REAL[name]
    assert type(config).__name__ == model.detected
    assert {k: config.unet_config.get(k) for k in expected} == expected
    assert round(sum(t.numel() for t in sd.values()) / 1e9, 1) == billions
    assert model.heads == expected["num_heads"]
    tiny = model.tiny_state_dict()  # the --tiny stand-in: the same keys, fewer blocks, narrower
    assert _blockless(tiny) == _blockless(sd)
    assert type(comfy.model_detection.model_config_from_unet(tiny, "")).__name__ == model.detected


def test_shapes_of_a_call():
    flux2, wan14, wan5 = MODELS["flux2-dev"], MODELS["wan2.1-14b"], MODELS["wan2.2-ti2v-5b"]
    assert bench_models.size("1024") == (1024, 1024) and bench_models.size("480p") == (832, 480)
    assert bench_models.size("1280x720") == (1280, 720)
    with pytest.raises(ValueError):
        bench_models.size("big")
    assert flux2.latent_shape(1024, 1024, 81, batch=2) == (2, 128, 64, 64)
    assert flux2.tokens(1024, 1024, 1) == 512 + 64 * 64  # patch 1 on a /16 latent, plus the text
    assert MODELS["flux1-dev"].tokens(1024, 1024, 1) == 512 + 64 * 64  # patch 2 on a /8 latent
    assert wan14.latent_shape(832, 480, 81) == (1, 16, 21, 60, 104)
    assert wan14.tokens(1280, 720, 81) == 21 * 45 * 80  # patch (1, 2, 2): the video only
    assert wan5.latent_shape(1280, 720, 81) == (1, 48, 21, 45, 80) and wan5.tokens(1280, 720, 81) == 21 * 22 * 40
    assert (flux2.blocks, wan14.blocks, wan5.blocks) == (56, 40, 30)


def test_arguments():
    a = bench_args.parse(["--model", "wan2.1-14b", "--gpu-cap", "24"])
    assert (a.sizes, a.frames, a.steps, a.warmup, a.gpu_cap) == ("480p,720p", 81, 3, 1, 24.0)
    assert bench_args.parse(["--model", "wan2.2-ti2v-5b", "--short"]).frames == 17
    a = bench_args.parse(["--model", "flux2-dev", "--weights", "fp8"])
    assert (a.sizes, a.steps, a.warmup, a.gpu_cap, a.store) == ("1024", 20, 12, None, "auto")
    assert bench_args.parse([]).sizes == "1024,2048"  # FLUX.1-dev, as before
    for wrong in (["--model", "sd3"], ["--sizes", "huge"], ["--model", "wan2.1-14b", "--weights", "gguf-q8_0"]):
        with pytest.raises(SystemExit):
            bench_args.parse(wrong)


@pytest.mark.parametrize("store", [torch.bfloat16, torch.float8_e4m3fn])
def test_written_file_loads_in_comfyui(tmp_path, store):
    """The writer (one tensor at a time, the real-size path) on the tiny FLUX.2's shapes: ComfyUI loads the file as
    FLUX.2, an fp8 file as bf16 where --weights bf16 asks (the same compute from half the file)."""
    import safetensors

    from comfy_xdit_patch.tools import weights

    model = MODELS["flux2-dev"]
    meta = {k: torch.empty(v.shape, device="meta") for k, v in model.tiny_state_dict().items()}
    path = bench_models.write(model, str(tmp_path / "w.safetensors"), store, "cpu", meta=meta)
    with safetensors.safe_open(path, "pt") as f:
        qkv = f.get_tensor("double_blocks.0.img_attn.qkv.weight")
        assert qkv.dtype == store and list(qkv.shape) == list(meta["double_blocks.0.img_attn.qkv.weight"].shape)
        assert f.get_tensor("final_layer.norm_final.weight" if "final_layer.norm_final.weight" in meta
                            else "img_in.weight").dtype in (torch.bfloat16, store)
        assert abs(qkv.float().std().item() - 0.02) < 0.005
    patcher = weights.load("bf16", path, str(tmp_path), "cpu", as_bf16=store != torch.bfloat16)
    assert type(patcher.model).__name__ == "Flux2"
    if store != torch.bfloat16:  # a bf16 file gets ComfyUI's own choice (fp32 on a CPU)
        assert patcher.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["flux2-dev", "flux2-klein-4b", "wan2.1-14b", "wan2.2-ti2v-5b"])
def test_tiny_baselines_run(tmp_path, name):
    """The bench's one-GPU side on each tiny model, --gpu-cap included (on a CPU: recorded as not applied)."""
    from comfy_xdit_patch.tools.bench import Bench

    a = bench_args.parse(["--model", name, "--tiny", "--steps", "1", "--warmup", "1", "--cfg", "1", "--gpu-cap", "4",
                          "--baselines", "eager", "--workdir", str(tmp_path), "--out", str(tmp_path / "out")])
    bench = Bench(a)
    latents = bench.baseline(bench.load())
    rows = bench.results["baseline"]
    assert [bool(r.get("capped")) for r in rows] == [False] * len(bench.sizes) + [True] * len(bench.sizes)
    assert bench.results["gpu_cap"] == {"gib": 4.0, "applied": None}
    assert all(r["rss_peak_gib"] > 0 and r["s_per_step"] > 0 for r in rows)
    (latent,) = latents.values()
    assert latent.shape == bench.latent(bench.sizes[0]) and latent.abs().max() > 0


def test_gpu_cap(monkeypatch):
    """--gpu-cap / COMFY_XDIT_GPU_CAP on a GPU process: torch's per-process fraction, and ComfyUI's reserve grown by
    what the cap takes away (from ComfyUI's own reserve, not stacked when capped again). torch's CUDA calls stand in
    for a GPU's."""
    import types

    import comfy.model_management as mm

    from comfy_xdit_patch.rank import facts

    GB = 2**30
    fractions = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=140 * GB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: fractions.append(f))
    monkeypatch.setattr(mm, "EXTRA_RESERVED_VRAM", GB // 2)
    monkeypatch.setattr(facts, "_RESERVE", {})
    cuda = torch.device("cuda", 0)
    assert facts.cap_memory(torch, mm, cuda, 24) == {"total": 140 * GB, "cap": 24 * GB, "reserve": GB // 2 + 116 * GB}
    assert mm.extra_reserved_memory() == GB // 2 + 116 * GB and fractions == [24 / 140]
    facts.cap_memory(torch, mm, cuda, 48)
    assert mm.extra_reserved_memory() == GB // 2 + 92 * GB and fractions[-1] == 48 / 140
    assert facts.cap_memory(torch, mm, torch.device("cpu"), 24) is None
