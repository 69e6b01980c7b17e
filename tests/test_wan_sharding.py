"""The Wan plan on its own, over 2 gloo ranks (no Ray, no sampler): a tiny WanModel's sharded call vs the whole
model, for the layouts and inputs that reach the seam differently (uneven token counts, a share of the video
as long as the text, CLIP-image context, per-frame timesteps, a CFG batch, the K/V-gather backend, compiled
blocks)."""
import os

import pytest
import torch

import ranks
from comfy_xdit_patch.rank import layout
from comfy_xdit_patch.wire.mesh import Mesh


def test_modulation_rows_follow_each_token_as_the_model_repeats_them():
    from comfy.ldm.wan.model import repeat_e

    for frames, tokens, world in [(5, 75, 2), (3, 12, 4), (4, 30, 4), (1, 9, 2), (7, 7, 2)]:
        rows = torch.randn(2, frames, 6, 3)
        whole = torch.stack([repeat_e(rows[:, :, i], torch.empty(2, tokens, 3)) for i in range(6)], dim=2)
        shards = layout.split(0, tokens, world)
        parts = [layout.take_rows(rows, tokens, s.img, s.pad, repeat_e) for s in shards]
        if frames == 1:
            assert all(p is rows for p in parts)  # one row serves every token: kept
            continue
        assert all(p.shape[1] == s.tokens for p, s in zip(parts, shards))
        assert torch.equal(torch.cat([p[:, :s.img_len] for p, s in zip(parts, shards)], dim=1), whole)


def _wan_cases(rank, world, cases, compile_blocks=False):
    """Each case (name, file, mesh, batch, (frames, h, w), text tokens, per-frame timesteps, backend) on these ranks."""
    import comfy.sd

    from comfy_xdit_patch import plans
    from comfy_xdit_patch.rank import attention, compiled, sharding
    from comfy_xdit_patch.rank.worker import build_groups
    from comfy_xdit_patch.tools import synthetic_wan

    if compile_blocks:
        import comfy.ldm.modules.attention as attn
        import comfy.ldm.wan.model as wan

        # NOTE: on a CPU ComfyUI picks sub-quadratic attention, which asks for free memory (a graph break in the
        # cross-attention); on GPUs it picks SDPA, as here
        wan.optimized_attention = attn.attention_pytorch
    for name, path, mesh, batch, (t, h, w), text, per_frame, backend in cases:
        model = comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float32}).model.diffusion_model
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, model.in_dim, t, h, w, generator=g)
        timestep = torch.rand(batch, t, generator=g) * 1000
        kwargs = dict(timestep=timestep if per_frame else timestep[:, 0],
                      context=torch.randn(batch, text, synthetic_wan.TEXT_DIM, generator=g))
        if model.img_emb is not None:
            kwargs["clip_fea"] = torch.randn(batch, 257, synthetic_wan.CLIP_DIM, generator=g)
        with torch.inference_mode():
            reference = model(x, **kwargs, transformer_options={})
            plan = plans.plan_for(model)
            groups = build_groups(mesh, rank)
            make = attention.factory(backend, mesh, groups)
            if compile_blocks:
                assert compiled.compile_blocks(model, plan.blocks) == len(model.blocks)
                make = compiled.routed(make)
            out = sharding.shard(plan, model, (x,), dict(kwargs, transformer_options={}), mesh, rank, groups, make)
        diff = (out - reference).abs().max().item()
        assert plan.family == "wan" and out.shape == reference.shape and diff < 1e-4, f"{name}, rank {rank}: {diff}"
        assert reference.abs().max() > 1e-2, name  # a real output, not zeros on both sides
    if compile_blocks:  # the blocks really ran compiled, cross-attention hook included: no graph breaks
        from torch._dynamo.utils import counters

        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters)


@pytest.fixture(scope="module")
def wan_files(tmp_path_factory):
    from comfy_xdit_patch.tools import synthetic, synthetic_wan

    folder = tmp_path_factory.mktemp("wan")
    made = {}

    def make(layout_name):
        if layout_name not in made:
            made[layout_name] = synthetic.save(synthetic_wan.tiny_wan(layout_name, heads=4, layers=2, seed=2),
                                               os.path.join(folder, f"wan_{layout_name}.safetensors"))
        return made[layout_name]

    return make


CASES = [  # name, layout, mesh, batch, (frames, h, w) of the latent, text tokens, a timestep per frame, backend
    ("uneven: filler on the last rank", "2.1-t2v", Mesh(1, 2, 1), 1, (5, 6, 10), 12, False, "torch"),
    ("a share as long as the text", "2.1-t2v", Mesh(1, 2, 1), 1, (3, 4, 8), 12, False, "torch"),
    ("K/V gather", "2.1-t2v", Mesh(1, 2, 1), 1, (5, 6, 10), 12, False, "gather"),
    ("cond + uncond on one rank each", "2.1-t2v", Mesh(2, 1, 1), 2, (3, 6, 10), 12, False, "torch"),
    ("CLIP-image + text cross-attention", "2.1-i2v", Mesh(1, 2, 1), 1, (5, 6, 10), 12, False, "torch"),
    ("a timestep per frame", "2.2-ti2v-5b", Mesh(1, 2, 1), 1, (5, 6, 10), 12, True, "torch"),
    ("a timestep per frame, odd everything", "2.2-ti2v-5b", Mesh(1, 2, 1), 1, (3, 5, 7), 9, True, "torch"),
]


def test_wan_plan_matches_whole_model(wan_files):
    """All cases in one pair of processes (each pair costs ~20 s of imports on 2 cores)."""
    ranks.run(_wan_cases, 2, [(n, wan_files(f), *rest) for n, f, *rest in CASES])


@pytest.mark.slow  # ~40 s: CPU inductor on 2 processes
def test_wan_compiled_blocks_match_whole_model(wan_files):
    """COMFY_XDIT_COMPILE: the self-attention's exchange an opaque op, the cross-attention compiled as ComfyUI's."""
    ranks.run(_wan_cases, 2, [(n, wan_files(f), *rest) for n, f, *rest in CASES[4:6]], True)
