"""Tiny models and conditioning the tests make for themselves (nothing is downloaded).

T5 can't be made tiny, so conditioning tensors are made directly (the server test uses a node).
"""
from __future__ import annotations

import torch

from comfy_xdit_patch.tools import synthetic

CONTEXT_DIM = synthetic.TINY_CONTEXT_DIM


def conditioning(seed: int, tokens: int = 8, guidance: float | None = 3.5, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(batch, 768, generator=g)}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=g), extra]]


def latent(h: int, w: int, batch: int = 1) -> dict:
    """An empty FLUX latent for an image of h x w pixels."""
    return {"samples": torch.zeros(batch, 16, h // 8, w // 8)}
