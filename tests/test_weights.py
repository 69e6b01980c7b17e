"""Weights shared by the ranks (COMFY_XDIT_SHARD_WEIGHTS=on): each rank keeps 1/N of every block's bytes and
gathers a block while the one before it computes. First over plain gloo ranks (rank/weights.py alone, every
loader's tensor kinds, bit-exact), then FLUX.2 workflows through real ComfyUI and a sharded worker group of 2 and
3 ranks vs ComfyUI alone (max |delta| <= 1e-4, every call routed), each rank's resident block weights read from
its "stats" reply."""
import dataclasses
import os

import pytest
import torch

import flux2_cases
import ranks
from comfy_xdit_patch.tools.diagnostics import Op, RankDiagnostics
from comfy_xdit_patch.wire.messages import Attach
from conftest import comparer
from flux2_cases import WORKFLOWS, make_lora

BLOCKS = ("double_blocks", "single_blocks")


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


# --- rank/weights.py over gloo ranks, no Ray ----------------------------------------------------------------
def _load(kind, path, folder, gguf_path):
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


def _shard_case(rank, world, kinds, path, folder, gguf_path):
    import comfy.model_management as mm

    from comfy_xdit_patch.rank.weights import RankWeights

    with torch.inference_mode():
        for kind in kinds:
            patcher = _load(kind, path, folder, gguf_path)
            mm.load_models_gpu([patcher], force_full_load=True)
            run = lambda: run_once(patcher)  # noqa: E731
            whole = run()
            weights = RankWeights("on", rank, world, torch.device("cpu"))
            weights.after_load("spec", patcher, BLOCKS)
            for _ in range(2):
                with weights.call("spec"):
                    assert torch.equal(run(), whole), kind  # the same bytes: bit-exact
            stats = weights.stats()
            assert_share(stats, world)
            assert stats["gathers"] == 2 * stats["blocks"], kind  # one gather per block per call
            weights.forget(patcher.model.diffusion_model)
            mm.unload_model_and_clones(patcher)
        # auto on GPUs: ranks decide alone (here rank 0 only), then agree at the first call; any rank sharding
        # makes all shard
        patcher = _load("default", path, folder, gguf_path)
        mm.load_models_gpu([patcher], force_full_load=True)
        whole = run_once(patcher)
        weights = RankWeights("auto", rank, world, torch.device("cpu"))
        weights._wanted = lambda *_: rank == 0
        weights.after_load("spec", patcher, BLOCKS)
        weights.unsettled = True  # as after_load sets it on GPUs
        assert weights.stats()["sharded"] == (rank == 0)
        weights.settle()
        with weights.call("spec"):
            assert torch.equal(run_once(patcher), whole)
        assert_share(weights.stats(), world)


def _stream_case(rank, world, cases, folder, gguf_path):
    """Each case (kind, model file, LoRA file) built with its blocks left in the file and streamed into this rank's
    shards (with the LoRA), then the same by ComfyUI alone in this process: the same output, bit-exact; the device
    proxy and the host memory read by the diagnostics' LoadWatch at every block. Kinds: _load's, "offload" (the
    default loader, the device's room set to half the shards) and "wan" (a Wan file, the default loader)."""
    import types

    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    from comfy_xdit_patch.rank.facts import host_memory
    from comfy_xdit_patch.rank.weights import RankWeights, _tensors, held_bytes
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
                base = _load(kind, path, folder, gguf_path)
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
            alone = comfy.sd.load_lora_for_models(_load(kind, path, folder, gguf_path), None, lora, 1.0, 0)[0]
            if i == 0 and label == "default":  # ComfyUI's loader copies every block: the measure sees a full copy
                # (only the first time: memory of a model ComfyUI unloaded comes back to later ones)
                assert anon() - before >= stats["block_bytes"], (anon() - before, stats)
            mm.load_models_gpu([alone], force_full_load=True)
            assert torch.equal(run_once(alone), out), label
            weights.forget(patched.model.diffusion_model)
            mm.unload_model_and_clones(base)
            mm.unload_model_and_clones(alone)


SLACK = 12 * 2**20  # host memory that moves under a load besides the weights (ComfyUI's objects, the allocator)


def run_once(patcher):
    g = torch.Generator().manual_seed(0)
    if type(patcher.model).__name__.startswith("WAN"):  # 16 latent channels, 3 frames; umT5's 4096-wide text
        x, ctx = torch.randn(1, 16, 3, 4, 6, generator=g), torch.randn(1, 8, 4096, generator=g)
        return patcher.model.apply_model(x, torch.tensor([0.5]), c_crossattn=ctx)
    x, ctx = torch.randn(1, 128, 3, 4, generator=g), torch.randn(1, 16, 32, generator=g)
    return patcher.model.apply_model(x, torch.tensor([0.5]), c_crossattn=ctx, guidance=torch.tensor([3.5]))


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_blocks_shared_bit_exact_for_every_tensor_kind(world, flux2_file, models_dir):
    """fp32, fp8 (plain float8 tensors), fp8 mixed precision (ComfyUI's QuantizedTensor: data + scale) and GGUF
    (GGMLTensor's quantized bytes): sharded as bytes, gathered, rebuilt, the same output as unsharded."""
    from comfy_xdit_patch import locate

    path = flux2_file("dev")
    gguf_path = locate.find_comfyui_gguf()
    kinds = ["default", "fp8_e4m3fn", "fp8mixed"]
    if gguf_path is not None and flux2_cases.gguf_loader() is not None:
        kinds.append("Q8_0")
    flux2_cases.quantized_files(models_dir, path, gguf=len(kinds) == 4)
    ranks.run(_shard_case, world, kinds, path, models_dir, gguf_path)


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

    from comfy_xdit_patch.rank.weights import RankWeights

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


def test_setting():
    from comfy_xdit_patch import config as cfg
    from comfy_xdit_patch.rank.weights import RankWeights

    assert cfg.load({}, gpus=2).shard_weights == "auto"
    assert cfg.load({"COMFY_XDIT_SHARD_WEIGHTS": "on"}, gpus=0).shard_weights == "on"
    with pytest.raises(cfg.ConfigError, match="COMFY_XDIT_SHARD_WEIGHTS"):
        cfg.load({"COMFY_XDIT_SHARD_WEIGHTS": "yes"}, gpus=2)
    assert not RankWeights("auto", 0, 2, torch.device("cpu"))._wanted(None)  # auto: never on CPU
    assert not RankWeights("on", 0, 1, torch.device("cpu"))._wanted(None)  # one rank: nothing to share


# --- FLUX.2 through ComfyUI and a sharded worker group ------------------------------------------------------
@pytest.fixture(scope="module", params=[(2, "on"), pytest.param((3, "on"), marks=pytest.mark.slow),
                                        pytest.param((3, "off"), marks=pytest.mark.slow)],
                ids=["2ranks", "3ranks", "3ranks-unsharded"])
def sharded(request, config, router):
    """A worker group of 2 or 3 ranks with COMFY_XDIT_SHARD_WEIGHTS=on (or off, the same workflows on 3 ranks
    with full copies) in place of the session's (this machine's CPUs host one group at a time); the session's
    comes back after the module."""
    from comfy_xdit_patch.driver import patch

    workers, setting = request.param
    session = patch.uninstall()
    mine = patch.install(dataclasses.replace(config, workers=workers, shard_weights=setting, timeout=120))
    try:
        yield mine
    finally:
        patch.uninstall()
        patch.install(session.config, router=session)


@pytest.fixture(scope="module")
def flux2(sharded, flux2_file, models_dir):
    """flux2(layout) -> (model, LoRA name); 3 heads on 3 ranks, so that Ulysses takes one head per rank."""
    import comfy.sd

    heads = 3 if sharded.config.workers == 3 else 2
    loaded = {}

    def get(layout):
        if layout not in loaded:
            path = flux2_file(layout, heads=heads)
            loaded[layout] = comfy.sd.load_diffusion_model(path), make_lora(models_dir, path)
        return loaded[layout]

    return get


def _slow(*case):
    return pytest.param(*case, marks=pytest.mark.slow)


SHARDED_CASES = [("dev", "text_to_image"), ("dev", "multi_reference_cfg"), ("klein", "lora")] + [
    _slow(*case) for case in flux2_cases.CASES
    if case not in (("dev", "text_to_image"), ("dev", "multi_reference_cfg"), ("klein", "lora"))]


@pytest.mark.parametrize("layout,workflow", SHARDED_CASES)
def test_sharded_flux2_workflow(sharded, unrouted, flux2, layout, workflow):
    model, lora = flux2(layout)
    comparer(sharded, unrouted, every_call=True)(lambda: WORKFLOWS[workflow](model, layout, lora))
    for stats in sharded.group.stats():
        assert_share(stats["weights"], sharded.group.world, sharded.config.shard_weights)


def test_lora_switches_reshard(sharded, unrouted, flux2, models_dir, flux2_file):
    """LoRA A, LoRA B, none: the patched weights are what is sharded, and each new spec is sharded again (the
    rank builds the model again from its file: ComfyUI can't restore weights its model no longer holds)."""
    import nodes

    from conftest import node

    model, lora_a = flux2("dev")
    lora_b = make_lora(models_dir, flux2_file("dev", heads=3 if sharded.config.workers == 3 else 2), seed=4)
    compare = comparer(sharded, unrouted, every_call=True)
    loads = [s["loads"] for s in sharded.group.stats()] if sharded.group else None
    outs = []
    on = sharded.config.shard_weights == "on"
    for lora in (lora_a, lora_b, None):
        patched = node(nodes.LoraLoaderModelOnly, model=model, lora_name=lora, strength_model=1.0)[0] if lora else model
        outs.append(compare(lambda: WORKFLOWS["text_to_image"](patched, "dev"))[0])
        stats = sharded.group.stats()
        for s in stats:
            assert_share(s["weights"], sharded.group.world, sharded.config.shard_weights)
        if lora is lora_a and on:  # the loads of B and none are watched: streamed block by block into the shards
            sharded.group.request(Attach(RankDiagnostics), all_reply=True)
    assert (outs[0] - outs[1]).abs().max() > 1e-3 and (outs[0] - outs[2]).abs().max() > 1e-3
    if loads is not None and on:
        assert all(s["loads"] - n >= 2 for s, n in zip(stats, loads))  # B and none: built again
        watched = sharded.group.request(Op("loadwatch", None), all_reply=True)
        for s in stats:
            w, world = s["weights"], sharded.group.world
            bound = w["block_bytes"] / world + 16 * world * w["blocks"] + 2 * (w["largest_block"] + 16 * world)
            records = watched[s["rank"]]
            assert len(records) == 2 and all(r["blocks"] == w["blocks"] for r in records), records
            assert max(r["peak_device_bytes"] for r in records) <= bound, (records, w)
            assert s["host_memory"]["rss_peak"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fp8_e4m3fn", "fp8mixed", "Q8_0"])
def test_sharded_loaders_with_lora(sharded, unrouted, flux2_file, models_dir, kind):
    """fp8 and GGUF weights are sharded as their bytes (no refusal), LoRA on top."""
    gguf = flux2_cases.gguf_loader()
    if kind == "Q8_0" and gguf is None:
        pytest.skip("no ComfyUI-GGUF checkout (set COMFYUI_GGUF_PATH) or no gguf package")
    path = flux2_file("dev", heads=3 if sharded.config.workers == 3 else 2)
    lora = make_lora(models_dir, path)
    compare = comparer(sharded, unrouted, every_call=True)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes (see test_flux2.test_flux2_loaders)
        model = flux2_cases.load(kind, path, models_dir, gguf)
        compare(lambda: WORKFLOWS["text_to_image"](model, "dev"))
        compare(lambda: WORKFLOWS["lora"](model, "dev", lora))
    for stats in sharded.group.stats():
        assert_share(stats["weights"], sharded.group.world, sharded.config.shard_weights)


def test_status_document_shows_each_ranks_share(sharded, flux2):
    from comfy_xdit_patch.driver import status

    model, _ = flux2("dev")
    WORKFLOWS["text_to_image"](model, "dev")
    status.attach(sharded)
    try:
        doc = status.snapshot(ask_ranks=True)
    finally:
        status.reset()
    assert doc["settings"]["shard_weights"] == sharded.config.shard_weights
    assert doc["ranks_error"] is None, doc["ranks_error"]
    on = sharded.config.shard_weights == "on"
    assert [r["weights"]["sharded"] for r in doc["ranks"]] == [on] * sharded.group.world
