"""How a rank loads its model (rank/streaming.py, rank/holding.py): streamed from the mapped file into its 1/N
shards block by block, or whole straight onto its device; where shards wait in host memory; the memory budget a
GPU rank decides by. Over plain gloo ranks, no Ray: ComfyUI alone's output, bit-exact, and the rank's host memory
read at every block."""
import os

import pytest
import torch

import flux2_cases
import ranks
from flux2_cases import make_lora
from shard_cases import BLOCKS, SLACK, assert_share, load_as, run_once


def _stream_case(rank, world, cases, folder, gguf_path):
    """Each case (kind, model file, LoRA file) built with its blocks left in the file and streamed into this rank's
    shards (with the LoRA), then the same by ComfyUI alone in this process: the same output, bit-exact; the device
    proxy and the host memory read by the diagnostics' LoadWatch at every block. Kinds: load_as's, "offload" (the
    default loader, the device's room set to half the shards) and "wan" (a Wan file, the default loader)."""
    import types

    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    from comfy_xdit_patch.rank.facts import host_memory
    from comfy_xdit_patch.rank.holding import RankWeights, _tensors, held_bytes
    from comfy_xdit_patch.tools.diagnostics import LoadWatch

    cpu = torch.device("cpu")
    anon = lambda: host_memory()["rss_anon"]  # noqa: E731
    with torch.inference_mode():
        for i, (kind, path, lora_path) in enumerate(cases):
            lora, names = comfy.utils.load_torch_file(lora_path), ("blocks",) if kind == "wan" else BLOCKS
            weights = RankWeights("on", rank, world, cpu)
            watch = LoadWatch(types.SimpleNamespace(weights=weights, device=cpu, torch=torch))
            if kind == "offload":  # the device's room holds half the shards: the others wait in host memory
                weights._room = lambda patcher, sizes: sum(sizes) / world / 2
            label, kind = kind, "default" if kind in ("offload", "wan") else kind
            before = anon()
            with weights.building():
                base = load_as(kind, path, folder, gguf_path)
            built = anon()
            patched = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)[0]
            mm.load_models_gpu([patched], force_full_load=weights.before_load("spec", patched, names))
            weights.after_load("spec", patched, names)
            with weights.call("spec"):
                out = run_once(patched)
            stats = weights.stats()
            if weights._room.__name__ == "<lambda>":  # offloaded: on the device, less than the share
                assert 0 < stats["offloaded_bytes"] < stats["shard_bytes"] and stats["resident_bytes"] == \
                    stats["shard_bytes"] - stats["offloaded_bytes"], stats
            else:
                assert_share(stats, world)
            (load,) = watch.take()
            pad = 16 * world * stats["blocks"]
            share, two = stats["block_bytes"] / world + pad, 2 * (stats["largest_block"] + 16 * world)
            rest = held_bytes(_tensors(patched.model.diffusion_model))  # outside the blocks (theirs are empty now)
            assert load["blocks"] == stats["blocks"] and load["peak_device_bytes"] <= share + two, (kind, load, stats)
            assert built - before <= rest + SLACK, (kind, built - before, rest)  # no block copied while building
            assert load["peak_rss_anon"] - before <= rest + share + two + SLACK, (kind, load, before, stats)
            print(f"rank {rank} {label}: blocks {stats['block_bytes'] / 2**20:.1f} MiB, peak on the device (proxy) "
                  f"{load['peak_device_bytes'] / 2**20:.1f} MiB, anonymous host memory +{(built - before) / 2**20:.1f} "
                  f"MiB built, +{(load['peak_rss_anon'] - before) / 2**20:.1f} MiB at peak, peak RSS "
                  f"{host_memory()['rss_peak'] / 2**20:.0f} MiB", flush=True)
            before = anon()
            alone = comfy.sd.load_lora_for_models(load_as(kind, path, folder, gguf_path), None, lora, 1.0, 0)[0]
            if i == 0 and label == "default":  # ComfyUI's loader copies every block: the measure sees a full copy
                # (only the first time: memory of a model ComfyUI unloaded comes back to later ones)
                assert anon() - before >= stats["block_bytes"], (anon() - before, stats)
            mm.load_models_gpu([alone], force_full_load=True)
            assert torch.equal(run_once(alone), out), label
            weights.forget(patched.model.diffusion_model)
            mm.unload_model_and_clones(base)
            mm.unload_model_and_clones(alone)



@pytest.mark.parametrize("world,kinds", [(2, ("default", "offload", "wan")), pytest.param(
    3, ("default", "fp8_e4m3fn", "fp8mixed", "Q8_0"), marks=pytest.mark.slow)])
def test_streamed_load_holds_a_share(world, kinds, flux2_file, models_dir, monkeypatch):
    """A model built with its blocks left in the mapped file and streamed into the shards block by block (LoRA
    applied per key by ComfyUI's patcher): the output of ComfyUI alone, bit-exact; at no point more than 1/N of
    the blocks + two on a rank's device, and no copy of the blocks in its host memory. "offload": the device has
    room for half the shards, the others wait in host memory and ComfyUI loads the rest partially."""
    from comfy_xdit_patch import locate

    # NOTE: glibc keeps freed allocations under its adaptive mmap threshold (up to 32 MiB) in the heap, which would
    # hide what a rank holds at this size; a fixed threshold returns them at once (a real model's tensors are
    # larger than 32 MiB: there it is glibc's own behaviour)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    path = flux2_file("dev", heads=4, depth=2, single=4)
    gguf_path = locate.find_comfyui_gguf()
    if "Q8_0" in kinds:
        if gguf_path is None or flux2_cases.gguf_loader() is None:
            kinds = tuple(k for k in kinds if k != "Q8_0")
        flux2_cases.quantized_files(models_dir, path, gguf="Q8_0" in kinds)
    lora = os.path.join(models_dir, make_lora(models_dir, path))
    cases = [(kind, path, lora) for kind in kinds if kind != "wan"]
    if "wan" in kinds:
        cases.append(("wan",) + _wan_files(models_dir))
    ranks.run(_stream_case, world, cases, models_dir, gguf_path)


def _whole_case(rank, world, path, lora_path):
    """A model with room for all of it (auto, one rank), built as a GPU rank builds it: blocks left in the mapped
    file, then loaded block by block onto the device (here the CPU), then ComfyUI's full load and LoRA patching:
    ComfyUI alone's output, bit-exact, also after ComfyUI unpatches and patches it again for another strength."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    from comfy_xdit_patch.rank.facts import host_memory
    from comfy_xdit_patch.rank.holding import RankWeights, _tensors, held_bytes

    lora = comfy.utils.load_torch_file(lora_path)
    with torch.inference_mode():
        weights = RankWeights("auto", rank, world, torch.device("cpu"))
        before = host_memory()["rss_anon"]
        with weights._deferred():  # what building() does on a GPU rank (a CPU rank's loader is ComfyUI's as it is)
            base = comfy.sd.load_diffusion_model(path)
        rest = held_bytes(_tensors(base.model.diffusion_model))  # the blocks' tensors are meta: the rest only
        assert host_memory()["rss_anon"] - before <= rest + SLACK  # no block copied while building
        for strength in (1.0, 0.5, 1.0):
            patched = comfy.sd.load_lora_for_models(base, None, lora, strength, 0)[0]
            assert weights.before_load(f"lora {strength}", patched, BLOCKS)  # whole: ComfyUI's full load
            mm.load_models_gpu([patched], force_full_load=True)
            weights.after_load(f"lora {strength}", patched, BLOCKS)
            stats = weights.stats()
            assert not stats["sharded"] and stats["resident_bytes"] == stats["block_bytes"] > 0, stats
            out = run_once(patched)
            alone = comfy.sd.load_lora_for_models(comfy.sd.load_diffusion_model(path), None, lora, strength, 0)[0]
            mm.load_models_gpu([alone], force_full_load=True)
            assert torch.equal(run_once(alone), out), strength
            mm.unload_model_and_clones(alone)


def test_whole_model_streamed_onto_the_device(flux2_file, models_dir, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # see test_streamed_load_holds_a_share
    path = flux2_file("dev", heads=4, depth=2, single=4)
    ranks.run(_whole_case, 1, path, os.path.join(models_dir, make_lora(models_dir, path)))


def _wan_files(folder: str) -> tuple:
    """A Wan 2.1 T2V of 4 blocks (512 wide) and a LoRA for it."""
    from comfy_xdit_patch.tools import synthetic, synthetic_wan

    path, lora = os.path.join(folder, "wan_stream.safetensors"), os.path.join(folder, "wan_stream_lora.safetensors")
    if not os.path.exists(lora):
        sd = synthetic_wan.tiny_wan("2.1-t2v", heads=4, layers=4, ffn_dim=1024)
        synthetic.save(sd, path)
        synthetic.save(synthetic.lora(sd, rank=4, scale=0.1, targets=synthetic_wan.LORA_TARGETS), lora)
    return path, lora


def test_placement():
    """Shards the device has no room for stay in host memory (each block in model order that still fits stays)."""
    from comfy_xdit_patch.rank.streaming import placement

    assert placement([100, 100, 100], 2, float("inf")) == [True] * 3
    assert placement([100, 100, 100], 2, 100) == [True, True, False]
    assert placement([100, 300, 100], 2, 120) == [True, False, True]
    assert placement([100], 4, 0) == [False]


def test_budget_on_a_gpu_rank(monkeypatch):
    """auto on a GPU rank: the whole model where it and a 1024² CFG call fit ComfyUI's free memory, less its reserve
    (--reserve-vram, grown by COMFY_XDIT_GPU_CAP), else shards; the shards' room is what is left after the rest of
    the model and two full blocks; a model that isn't sharded and doesn't fit goes to ComfyUI's partial loading.
    ComfyUI's memory functions stand in for a GPU's."""
    import types

    import comfy.model_management as mm

    from comfy_xdit_patch.rank.holding import RankWeights

    GB = 2**30
    free = {"bytes": 40 * GB}
    monkeypatch.setattr(mm, "get_free_memory", lambda device=None, torch_free_too=False: free["bytes"])
    monkeypatch.setattr(mm, "EXTRA_RESERVED_VRAM", 1 * GB)
    model = types.SimpleNamespace(latent_format=types.SimpleNamespace(spacial_downscale_ratio=16, latent_channels=128))
    patcher = types.SimpleNamespace(model=model, model_size=lambda: 32 * GB, loaded_size=lambda: 0,
                                    memory_required=lambda shape: 3 * GB)
    weights = RankWeights("auto", 0, 4, torch.device("cuda"))
    assert weights._fits(patcher) and not weights._wanted(patcher, loaded=False)  # 32 + 3 + 1 <= 40
    free["bytes"] = 24 * GB
    assert not weights._fits(patcher) and weights._wanted(patcher, loaded=False)
    sizes = [GB] * 30  # 30 GiB of blocks: 2 GiB outside them
    assert weights._room(patcher, sizes) == 24 * GB - 4 * GB - 2 * GB - 2 * GB  # 16 GiB for 7.5 GiB of shards
    free["bytes"] = 12 * GB  # 12 - 4 - 2 - 2 = 4 GiB: 16 of the 30 quarter-GiB shards, the rest in host memory
    from comfy_xdit_patch.rank.streaming import placement

    assert placement(sizes, 4, weights._room(patcher, sizes)) == [True] * 16 + [False] * 14
