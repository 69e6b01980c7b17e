"""The VAE decode shared out by rows (rank/vae.py) on its own, over gloo ranks (no Ray): tiny real ComfyUI VAEs
(FLUX's KL VAE and Wan 2.1's through comfy.sd.VAE; Wan 2.2's class directly, as ComfyUI fixes its size) decoded
by 3 ranks and by a group of 2, for heights that don't divide, against ComfyUI's own decode on one process."""
import dataclasses
import os
import pickle

import pytest
import torch

import ranks
from comfy_xdit_patch.errors import Unroutable
from comfy_xdit_patch.rank import vae as rows_vae
from comfy_xdit_patch.tools import synthetic, synthetic_wan

TOL = 1e-4


def test_rows_are_shared_out_in_order_the_first_ranks_one_more():
    assert rows_vae.split_rows(7, 3) == (3, 2, 2) and rows_vae.split_rows(4, 2) == (2, 2)
    assert rows_vae.split_rows(3, 3) == (1, 1, 1)
    with pytest.raises(Unroutable):
        rows_vae.split_rows(2, 3)  # a rank would hold no row


def test_only_vaes_and_modules_a_row_split_keeps_exact_are_taken():
    import comfy.sd

    for sd in (synthetic.kl_vae(), synthetic_wan.tiny_wan_vae()):
        rows_vae.check(comfy.sd.VAE(sd=sd).first_stage_model)
    with pytest.raises(Unroutable, match="not one the ranks decode"):
        rows_vae.check(comfy.sd.VAE(sd=synthetic.taesd_vae(16)).first_stage_model)
    model = comfy.sd.VAE(sd=synthetic.kl_vae()).first_stage_model
    model.decoder.up[1].block[0].conv1.stride = (2, 2)  # a convolution that drops rows
    with pytest.raises(Unroutable, match="up.1.block.0.conv1"):
        rows_vae.check(model)


def _wan22(seed=0):
    """A tiny Wan 2.2 VAE (48-channel latents, 16x: patchified output, DupUp3D shortcuts), as its class makes it."""
    from comfy.ldm.wan.vae2_2 import WanVAE

    torch.manual_seed(seed)
    model = WanVAE(dim=16, dec_dim=16, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                   temperal_downsample=[False, True, True])
    for m in model.modules():
        for base in (torch.nn.Conv3d, torch.nn.Conv2d):
            if isinstance(m, base):
                base.reset_parameters(m)
                break
    return model.eval()


def _cases(rank, world, results):
    """Each VAE and latent decoded by all 3 ranks and by a group of ranks 0 and 1, against ComfyUI's whole decode."""
    import json

    import comfy.sd
    import torch.distributed as dist

    torch.set_num_threads(1)
    pair = dist.new_group([0, 1])  # NOTE: collective: every rank makes it
    kl, wan21 = comfy.sd.VAE(sd=synthetic.kl_vae()), comfy.sd.VAE(sd=synthetic_wan.tiny_wan_vae())
    cases = [  # (name, VAE or first-stage model, latent shape, group)
        ("kl 7 rows / 3", kl, (2, 16, 7, 5), None), ("kl 3 rows / 3", kl, (1, 16, 3, 4), None),
        ("kl 5 rows / 2", kl, (1, 16, 5, 6), pair),
        ("wan2.1 9 frames, 7 rows / 3", wan21, (1, 16, 3, 7, 5), None),
        ("wan2.1 5 frames, 5 rows / 2", wan21, (1, 16, 2, 5, 4), pair),
        ("wan2.2 5 frames, 5 rows / 3", _wan22(), (1, 48, 2, 5, 4), None),
    ]
    worst = {}
    for name, vae, shape, group in cases:
        if group is pair and rank > 1:
            continue
        model = getattr(vae, "first_stage_model", vae)
        latent = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
        rows = rows_vae.Rows(rows_vae.split_rows(shape[-2], world if group is None else 2), rank, group)
        with torch.inference_mode():
            out = rows_vae.decode(model, latent, rows)
            if name.endswith("7 rows / 3"):  # this rank's rows decoded without the split's exchanges differ
                alone, whole = model.decode(rows.take(latent)), model.decode(latent)
                own = rows.now(alone.shape[-2])
                assert (alone - whole.narrow(-2, sum(own[:rank]), own[rank])).abs().max() > 1e-2, name
        assert not any("forward" in m.__dict__ for m in model.modules()), name  # as ComfyUI made them again
        if rank != 0:
            assert out is None
            continue
        if isinstance(vae, comfy.sd.VAE):  # ComfyUI's whole decode, process_output included
            out, whole = vae.process_output(out.float().clone()).movedim(1, -1), vae.decode(latent)
        else:
            whole = model.decode(latent)
        worst[name] = (out - whole).abs().max().item()
        assert out.shape == whole.shape and worst[name] <= TOL, (name, worst[name])
        assert whole.std() > 0.05, name  # a picture, not a constant
    if rank == 0:
        with open(results, "w") as f:
            json.dump(worst, f)


def test_decode_by_rows_equals_comfyuis_decode(tmp_path):
    import json

    ranks.run(_cases, 3, str(tmp_path / "worst.json"))
    worst = json.loads((tmp_path / "worst.json").read_text())
    assert len(worst) == 6, worst
    print("max |delta| by case:", worst)


def _requests(rank, world, pickled, path):
    """The rank's request handler: the VAE built from ComfyUI's recipe; a rank that sees another file makes all
    refuse, before any exchange (none is left waiting)."""
    import pickle

    import comfy.sd

    from comfy_xdit_patch.wire.messages import Decode

    torch.set_num_threads(1)
    spec = pickle.loads(pickled)  # NOTE: after ComfyUI's import on the CPU (the recipe names comfy.sd)
    handler = rows_vae.Decodes(rank, world, torch.device("cpu"))
    latent = torch.randn(1, 16, 5, 4, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        out = handler(Decode(spec, latent, 0))
        whole = comfy.sd.VAE(sd=comfy.utils.load_torch_file(path)).first_stage_model.decode(latent)
    if rank == 0:
        assert (out - whole).abs().max().item() <= TOL
    else:
        assert out is None
    assert handler.count == 1 and list(handler.vaes) == [spec.key]
    with pytest.raises(Unroutable, match="sharded"):  # weights shared by the ranks stay where they are
        handler(Decode(spec, latent, 0), sharded=True)
    if rank == 1:  # this rank's file is another one
        path_, size, mtime = spec.files[0]
        spec = dataclasses.replace(spec, key="other", files=((path_, size + 1, mtime),))
    with pytest.raises(Unroutable, match="rank 1 sees another file"):
        handler(Decode(spec, latent, 0))
    assert handler.count == 1


def test_ranks_build_the_vae_from_comfyuis_recipe_and_refuse_together(tmp_path):
    import folder_paths
    import nodes

    from comfy_xdit_patch.driver.models import spec_for

    path = synthetic.save(synthetic.kl_vae(seed=1), str(tmp_path / "tiny_kl.safetensors"))
    folder_paths.add_model_folder_path("vae", str(tmp_path))
    (vae,) = nodes.VAELoader().load_vae("tiny_kl.safetensors")
    spec = spec_for(vae.patcher)  # the loader's recipe: comfy.sd.load_vae_patcher(path, ...)
    assert spec.files and spec.files[0][0] == os.path.abspath(path)
    ranks.run(_requests, 2, pickle.dumps(spec), path)
