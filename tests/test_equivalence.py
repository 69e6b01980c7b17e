"""Routed (2 CPU ranks over gloo) vs ComfyUI's own single-process result, through KSampler, fp32."""
import pytest

import tiny
from conftest import ksample


@pytest.mark.parametrize("h,w", [(64, 64), (80, 48)], ids=["divisible", "odd-tokens"])
def test_ksampler_matches_comfyui(compare, load_flux, tiny_flux, h, w):
    model = load_flux(tiny_flux)
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    latent = tiny.latent(h, w)
    tokens = 8 + (h // 16) * (w // 16)
    assert (tokens % 2 == 0) == (h == 64)  # 8 + 16 = 24 divides; 8 + 15 = 23 doesn't
    routed, _, calls = compare(lambda: ksample(model, pos, neg, latent, steps=3))
    assert calls == 3  # one routed model call per step at cfg 1


def test_forced_layout_reaches_the_workers(compare, router, load_flux, tiny_flux, monkeypatch):
    """COMFY_XDIT_PARALLEL: a CFG batch forced onto sequence parallelism (auto would pick cfg=2)."""
    import dataclasses

    from comfy_xdit_patch.config import Mesh

    monkeypatch.setattr(router, "config", dataclasses.replace(router.config, parallel=Mesh(ulysses=2)))
    model = load_flux(tiny_flux)
    forced, auto = router.stats["layout cfg=1,ulysses=2,ring=1"], router.stats["layout cfg=2,ulysses=1,ring=1"]
    _, _, calls = compare(lambda: ksample(model, tiny.conditioning(1), tiny.conditioning(2), tiny.latent(64, 48), cfg=3.5))
    assert router.stats["layout cfg=1,ulysses=2,ring=1"] == forced + calls  # every call took the forced layout
    assert router.stats["layout cfg=2,ulysses=1,ring=1"] == auto

