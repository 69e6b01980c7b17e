"""CUDA graphs of whole model calls (graphs.CallGraphs) replay what the eager call computes, also with
the blocks compiled (COMFY_XDIT_COMPILE). GPU only (one GPU, no ranks)."""
import pytest
import torch

from comfy_xdit_patch.rank import compiled, graphs
from comfy_xdit_patch.tools import synthetic

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("compile", [False, True])
def test_replay_equals_eager(tmp_path, compile):
    import comfy.sd

    path = synthetic.save(synthetic.tiny_flux(heads=4, depth=2, single=4, seed=5), str(tmp_path / "f.safetensors"))
    model = comfy.sd.load_diffusion_model(path, model_options={"dtype": torch.float32}).model.diffusion_model.cuda()
    if compile:
        compiled.compile_blocks(model, ("double_blocks", "single_blocks"))
    g = torch.Generator().manual_seed(0)

    def inputs():
        return ((torch.randn(1, 16, 8, 8, generator=g).cuda(),),
                dict(timestep=torch.rand(1, generator=g).cuda(), context=torch.randn(1, 8, 32, generator=g).cuda(),
                     y=torch.randn(1, 768, generator=g).cuda(), guidance=torch.full((1,), 3.5).cuda(),
                     transformer_options={}))

    def run(a):
        return model(*a[0], **a[1])

    calls = graphs.CallGraphs()
    with torch.inference_mode():
        for i in range(4):  # eager, captured, replayed twice: each with new inputs
            a = inputs()
            expected = run(a).clone()
            got = calls.run("k", run, a).clone()
            assert torch.equal(got, expected), f"call {i}"
    assert calls.replays == 3  # the captured call is replayed too
