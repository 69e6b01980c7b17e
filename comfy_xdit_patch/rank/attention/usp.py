"""yunchang's USP (Ulysses all-to-all x Ring) as a ComfyUI attention override.

Only yunchang's own modules are imported (not xfuser's wrappers, whose pinned pairs fail to import).
The ring merges blocks by their log-sum-exp, so its kernel must return a true LSE: the torch flash /
efficient / cuDNN SDPA kernels do; the math kernel does not (results silently wrong), so it is only
used with ring == 1.
"""
from __future__ import annotations

import torch
from yunchang import LongContextAttention
from yunchang.globals import PROCESS_GROUP
from yunchang.kernels import AttnType

# Kernel used inside the ring / after the all-to-all, by device (COMFY_XDIT_USP_KERNEL overrides).
# cuDNN on CUDA: with it the ring is exact and replays from a CUDA graph as it ran eagerly (4x H100);
# torch_flash and torch_efficient replayed differently.
_KERNELS = {"cuda": AttnType.TORCH_CUDNN, "cpu": AttnType.TORCH_MATH}


class USPAttention:
    def __init__(self, mesh, groups, kernel: str = "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.kernel = _KERNELS[device] if kernel == "auto" else AttnType.from_string(kernel)
        if mesh.ring > 1 and self.kernel == AttnType.TORCH_MATH:
            raise ValueError("ring attention needs a kernel that returns a true LSE (not torch_math)")
        # NOTE: yunchang reads its process groups from a process-wide singleton at construction.
        PROCESS_GROUP.ULYSSES_PG = groups.ulysses
        PROCESS_GROUP.RING_PG = groups.ring
        self.attn = LongContextAttention(ring_impl_type="basic", attn_type=self.kernel)

    def override(self, func, q, k, v, heads, *args, skip_reshape=False, **kwargs):
        # ComfyUI hands (B, H, L, D) after RoPE; yunchang wants (B, L, H, D).
        b, h, length, d = q.shape
        out = self.attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
        return out.reshape(b, length, h * d)
