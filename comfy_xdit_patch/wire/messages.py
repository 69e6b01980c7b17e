"""The requests ComfyUI's process sends the ranks, and the ranks' replies: types both ends import.

Each request names its `op` (the rank's handler, and what the channel's timings are keyed by); its fields
cross as one pickled body, tensors through the channel's payload (wire/channel.py).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from .spec import ModelSpec


class Prepare(NamedTuple):
    """Make this model current on the rank's device (loaded once, its patches applied)."""
    spec: ModelSpec
    op = "prepare"


class Call(NamedTuple):
    """One diffusion-model call, run by every rank over `mesh`; rank 0 replies with the output."""
    key: str  # the ModelSpec.key made current by Prepare
    family: str  # plans: which Plan applies
    mesh: Any  # config.Mesh: the call's layout
    chunks: int | tuple[int, ...]  # how the Ulysses exchange is cut: equal pieces, or heads per piece
    args: tuple
    kwargs: dict
    op = "call"


class Decode(NamedTuple):
    """One VAE decode, shared out among all ranks by rows (rank/vae.py); rank 0 replies with the decoder's
    output, channels first, as ComfyUI's first-stage model returns it."""
    spec: ModelSpec  # the VAE's patcher: ComfyUI's recipe for it (its loader and file)
    latent: Any  # the whole latent, as ComfyUI's VAE.decode takes it: (batch, channels, [frames,] height, width)
    memory: int  # bytes ComfyUI estimates a rank's share of one latent needs (load_models_gpu's memory_required)
    op = "decode"


class Stats(NamedTuple):
    """What the rank holds and has done (status, tests, the bench); `reset` zeroes its call count and peak."""
    reset: bool = False
    op = "stats"


class Attach(NamedTuple):
    """Attach a diagnostics object made by `factory(worker)` (the bench's; never by default)."""
    factory: Any
    op = "attach"


# --- replies to Prepare ---------------------------------------------------------------------------
class Ready(NamedTuple):
    """The model is current on this rank."""


class NeedPatches(NamedTuple):
    """The spec came without its weight patches, and this rank doesn't hold them: send them."""


class FilesAbsent(NamedTuple):
    """The model's files are not on this rank's node."""
    node: str  # the node's address
    paths: list
