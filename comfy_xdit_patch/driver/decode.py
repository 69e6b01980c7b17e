"""ComfyUI's VAE decode on the worker group: each rank decodes a band of the latent's rows (rank/vae.py).

ComfyUI has no wrapper seam for VAEs; `comfy.sd.VAE.decode` is the method its decode nodes call (VAEDecode, and
the video nodes through it), so `VaeDecode` wraps it with wrapt (driver/patch.py). A decode goes to the ranks when

- the plugin is on and its worker group is up (a decode never starts one), between sampling runs,
- the VAE is one the ranks decode by rows (plans/vae.py) and can build: ComfyUI's loader left a recipe on its
  patcher (VAELoader, the checkpoint loaders), and nothing patches it,
- the group has two ranks or more, no `vae_options`, a latent at least a row per rank high, and an output of at
  least COMFY_XDIT_VAE_MIN_PIXELS pixels per latent (frames x height x width).

Otherwise, or when anything fails, ComfyUI's own decode runs: the same image. The ranks return the decoder's
output; what ComfyUI's decode does after it (output device and dtype, `process_output`, channels last) is
done here by ComfyUI's own VAE object.
"""
from __future__ import annotations

import logging
import time

from ..errors import Unroutable
from ..plans.vae import vae_kind
from ..wire.messages import Decode
from .models import spec_for

log = logging.getLogger("comfy_xdit_patch")


def output_pixels(vae, latent) -> int:
    """Pixels ComfyUI's decode of one latent of `latent` makes (frames x height x width)."""
    frames = 1
    if latent.ndim == 5:
        ratio = vae.upscale_ratio
        frames = ratio[0](latent.shape[2]) if isinstance(ratio, tuple) and callable(ratio[0]) else latent.shape[2]
    scale = vae.spacial_compression_decode()
    return int(frames * latent.shape[-2] * scale * latent.shape[-1] * scale)


class VaeDecode:
    """The wrapper of comfy.sd.VAE.decode(samples_in, vae_options={}); reads the Router's config and group."""

    def __init__(self, router):
        self.router = router
        self.off: str | None = None  # why the ranks decode no more in this process (a failure that would repeat)
        self._said: set = set()

    def __call__(self, wrapped, vae, args, kwargs):
        named = dict(zip(("samples_in", "vae_options"), args), **kwargs)
        latent, options = named.get("samples_in"), named.get("vae_options") or {}
        if latent is not None and latent.ndim == 5 and getattr(vae, "latent_dim", None) == 2:
            latent = latent[:, :, 0]  # as ComfyUI's decode does
        try:
            group = self._group(vae, latent, options)
        except Exception:  # a check that can't run (a VAE of another ComfyUI): never breaks ComfyUI's decode
            log.debug("comfy_xdit_patch: could not check a VAE decode", exc_info=True)
            group = None
        if group is not None:
            try:
                return self._on_ranks(group, vae, latent)
            except Exception as e:
                self._failed(e, vae)
        return wrapped(*args, **kwargs)

    def _group(self, vae, latent, options):
        """The worker group to decode on, or None: ComfyUI decodes."""
        router, config = self.router, self.router.config
        group = router.group
        if group is None or not router.active or self.off or config.vae_min_pixels is None or options:
            return None
        if router.run is not None:  # inside a sampling run (a node's preview): the ranks keep to the model
            return None
        model = getattr(vae, "first_stage_model", None)
        if model is None or vae_kind(model) is None or latent is None or latent.ndim != 2 + vae.latent_dim:
            return None
        if group.world < 2:  # one rank decodes what ComfyUI would, a round trip later (1x H200: +14 % FLUX 2048²)
            return None
        if latent.shape[-2] < group.world or output_pixels(vae, latent) < config.vae_min_pixels:
            return None
        return group

    def _on_ranks(self, group, vae, latent):
        router = self.router
        if vae.patcher.cached_patcher_init is None:
            raise Unroutable("the VAE's loader left no recipe the ranks could load it by (VAELoader and the "
                             "checkpoint loaders do)")
        spec = spec_for(vae.patcher)
        if spec.patches or spec.object_patches:
            raise Unroutable("the VAE is patched")
        share = (1,) + tuple(latent.shape[1:-2]) + (-(-latent.shape[-2] // group.world), latent.shape[-1])
        memory = int(vae.memory_used_decode(share, vae.vae_dtype))
        t0 = time.perf_counter()
        router.life.sampling += 1  # NOTE: the idle watch leaves the group to this decode, as to a sampling run
        try:
            out = group.request(Decode(spec, latent, memory), timeout=router.config.load_timeout)
        finally:
            router.life.sampling -= 1
        pixels = out.to(device=vae.output_device, dtype=vae.vae_output_dtype(), copy=True)
        pixels = vae.process_output(pixels)  # in place in ComfyUI; its result either way
        router.stats["routed_decodes"] += 1
        log.info("comfy_xdit_patch: decoded a %s latent with the %s VAE on %d ranks in %.2fs",
                 "x".join(map(str, latent.shape)), vae_kind(vae.first_stage_model), group.world,
                 time.perf_counter() - t0)
        return pixels.to(vae.output_device).movedim(1, -1)

    def _failed(self, e: Exception, vae) -> None:
        router = self.router
        if isinstance(e, Unroutable):  # refused before any collective: nothing is wrong with the group
            if (id(vae), str(e)) not in self._said:
                self._said.add((id(vae), str(e)))
                log.info("comfy_xdit_patch: decoding in ComfyUI's process: %s", e)
            return
        router.stats["decode_fallbacks"] += 1
        kind = router.group.classify(e) if router.group is not None else e
        log.warning("comfy_xdit_patch: a VAE decode on the ranks failed (%s: %s); ComfyUI decodes it",
                    type(kind).__name__, kind)
        # NOTE: a rank that failed in the middle of the decode leaves its peers waiting in an exchange
        router.close_group()
        if not getattr(kind, "transient", False):
            self.off = f"{type(kind).__name__}: {kind}"
            log.error("comfy_xdit_patch: VAE decodes stay in ComfyUI's process from now on: %s", self.off)
        if router.config.fallback == "error":
            raise kind
