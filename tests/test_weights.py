"""Weights shared by the ranks (COMFY_XDIT_SHARD_WEIGHTS=on): each rank keeps 1/N of every block's bytes and
gathers a block while the one before it computes. First over plain gloo ranks (rank/weights.py alone, every
loader's tensor kinds, bit-exact), then FLUX.2 workflows through real ComfyUI and a sharded worker group of 2 and
3 ranks vs ComfyUI alone (max |delta| <= 1e-4, every call routed), each rank's resident block weights read from
its "stats" reply."""
import dataclasses

import pytest
import torch

import flux2_cases
import ranks
from comfy_xdit_patch.tools.diagnostics import Op, RankDiagnostics
from comfy_xdit_patch.wire.messages import Attach
from conftest import comparer
from flux2_cases import WORKFLOWS, make_lora
from shard_cases import BLOCKS, assert_share, load_as, run_once


# --- rank/weights.py over gloo ranks, no Ray ----------------------------------------------------------------
def _shard_case(rank, world, kinds, path, folder, gguf_path):
    import comfy.model_management as mm

    from comfy_xdit_patch.rank.holding import RankWeights

    with torch.inference_mode():
        for kind in kinds:
            patcher = load_as(kind, path, folder, gguf_path)
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
        patcher = load_as("default", path, folder, gguf_path)
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



def test_setting():
    from comfy_xdit_patch import config as cfg
    from comfy_xdit_patch.rank.holding import RankWeights

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
