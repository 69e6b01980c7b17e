"""Soak: 50 prompts in a row on one ComfyUI server with the plugin (mixed sizes, LoRA on/off, cfg 1 and
3.5): ComfyUI's and the ranks' memory, open fds and shared-memory segments grow by 2 % at most from
prompt 10 to 50, and the same ranks serve every prompt (tools/soak.py)."""
import pytest

from comfy_xdit_patch.tools import soak


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_soak_50_prompts(tmp_path, router):
    router.close_group()  # 2 cores: the server's ranks get them to themselves
    text, ok = soak.soak(str(tmp_path), 50, gpu=False)
    print(text)
    assert ok, text
