"""ComfyUI's VAE decode through the plugin (driver/decode.py): with the session's 2 CPU ranks up, a decode of a
VAE ComfyUI's VAELoader loaded runs on the ranks, each a band of rows, and equals ComfyUI alone; what can't
go (too small, no recipe, a file the ranks see changed) is decoded by ComfyUI itself, the same image."""
import dataclasses
import os

import comfy.sd
import folder_paths
import nodes
import pytest
import torch

from comfy_xdit_patch.driver.models import run_node
from comfy_xdit_patch.tools import synthetic, synthetic_wan

TOL = 1e-4


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    synthetic.save(synthetic.kl_vae(seed=2), str(folder / "tiny_kl.safetensors"))
    synthetic.save(synthetic_wan.tiny_wan_vae(seed=2), str(folder / "tiny_wan21.safetensors"))
    folder_paths.add_model_folder_path("vae", str(folder))
    return folder


@pytest.fixture
def decodes(router, unrouted, monkeypatch):
    """decode(vae, latent, min_pixels) -> (ComfyUI alone's image, the plugin's, decodes the ranks ran): the group up."""

    def run(vae, latent, min_pixels=0):
        router.life.get()  # a decode never starts a group: a sampling run would have
        monkeypatch.setattr(router, "config", dataclasses.replace(router.config, vae_min_pixels=min_pixels))
        with unrouted():
            alone = vae.decode(latent)
        before = router.stats["routed_decodes"], [s["decodes"] for s in router.group.stats()]
        image = vae.decode(latent)
        after = router.stats["routed_decodes"], [s["decodes"] for s in router.group.stats()]
        ran = after[0] - before[0]
        assert [a - b for a, b in zip(after[1], before[1])] == [ran] * router.group.world  # every rank took part
        assert image.shape == alone.shape and alone.std() > 0.05
        return alone, image, ran

    return run


@pytest.mark.parametrize("name,shape", [("tiny_kl.safetensors", (2, 16, 7, 5)),
                                        ("tiny_wan21.safetensors", (1, 16, 3, 5, 6))], ids=["flux-kl", "wan2.1"])
def test_a_decode_runs_on_the_ranks_and_equals_comfyui_alone(decodes, vae_folder, name, shape):
    (vae,) = nodes.VAELoader().load_vae(name)
    latent = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    alone, image, ran = decodes(vae, latent)
    assert ran == 1
    print(f"{name}: max |delta| {(image - alone).abs().max().item():.2e}")
    assert (image - alone).abs().max().item() <= TOL


def test_what_cant_go_is_decoded_by_comfyui(decodes, vae_folder):
    (vae,) = nodes.VAELoader().load_vae("tiny_kl.safetensors")
    latent = torch.randn(1, 16, 6, 5, generator=torch.Generator().manual_seed(2))
    assert decodes(vae, latent, min_pixels=2048 * 2048)[2] == 0  # 48 x 40 pixels: below the threshold
    unnamed = comfy.sd.VAE(sd=synthetic.kl_vae(seed=2))  # made from a state dict: no recipe the ranks could replay
    alone, image, ran = decodes(unnamed, latent)
    assert ran == 0 and torch.equal(alone, image)
    tall = torch.randn(1, 16, 1, 5, generator=torch.Generator().manual_seed(2))  # one latent row for 2 ranks
    assert decodes(vae, tall)[2] == 0


def test_one_rank_leaves_the_decode_to_comfyui(decodes, vae_folder, router, monkeypatch):
    """A group of one rank would decode what ComfyUI decodes, a round trip later (measured slower): ComfyUI does."""
    (vae,) = nodes.VAELoader().load_vae("tiny_kl.safetensors")
    router.life.get()
    monkeypatch.setattr(router.group, "world", 1)  # as a one-GPU group sees it (the session's has 2 CPU ranks)
    alone, image, ran = decodes(vae, torch.randn(1, 16, 6, 5, generator=torch.Generator().manual_seed(2)))
    assert ran == 0 and torch.equal(alone, image)


def test_a_file_the_ranks_see_changed_is_refused_and_decoded_here(decodes, vae_folder, router):
    synthetic.save(synthetic.kl_vae(seed=3), str(vae_folder / "changing_kl.safetensors"))
    (vae,) = run_node(nodes.VAELoader, vae_name="changing_kl.safetensors")  # as ComfyUI's executor runs it
    path = str(vae_folder / "changing_kl.safetensors")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file is no longer the one ComfyUI read
    latent = torch.randn(1, 16, 4, 5, generator=torch.Generator().manual_seed(2))
    fallbacks = router.stats["decode_fallbacks"]
    alone, image, ran = decodes(vae, latent)
    assert ran == 0 and torch.equal(alone, image)
    assert router.stats["decode_fallbacks"] == fallbacks and router.group is not None  # refused: nothing broke


def test_a_decode_that_times_out_falls_back_and_the_next_group_decodes_again(decodes, vae_folder, router,
                                                                             monkeypatch):
    """A failure on the ranks (here COMFY_XDIT_LOAD_TIMEOUT, which bounds a decode, passes while they build the
    VAE): ComfyUI's image all the same; the group is closed (a rank may still be in an exchange), and decodes
    go to the ranks again once a group is up."""
    synthetic.save(synthetic.kl_vae(seed=4), str(vae_folder / "slow_kl.safetensors"))
    (vae,) = run_node(nodes.VAELoader, vae_name="slow_kl.safetensors")
    latent = torch.randn(1, 16, 4, 5, generator=torch.Generator().manual_seed(2))
    fallbacks = router.stats["decode_fallbacks"]
    config = router.config
    monkeypatch.setattr(router, "config", dataclasses.replace(config, vae_min_pixels=0, load_timeout=0.05))
    image = vae.decode(latent)
    assert router.stats["decode_fallbacks"] == fallbacks + 1 and router.group is None and router.active
    monkeypatch.setattr(router, "config", config)
    alone, again, ran = decodes(vae, latent)  # a new group
    assert ran == 1 and torch.equal(alone, image) and (again - alone).abs().max().item() <= TOL
