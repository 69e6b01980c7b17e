"""The models `comfy-xdit bench --model` runs, with synthetic weights: real key names and shapes, taken from
ComfyUI's own model classes built on the meta device, so ComfyUI's model detection finds each one as what it
imitates (tests/test_bench_models.py), and random N(0, 0.02) values (norm scales 1). `--tiny`: a model of the
same family and key set small enough for a CPU.

A real-size file is written one tensor at a time (generated on the GPU, then appended to the file), so writing
FLUX.2 [dev] (32 B parameters) needs neither its size in host memory nor a second copy.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import zlib

import torch

from . import synthetic, synthetic_wan


@dataclasses.dataclass(frozen=True)
class BenchModel:
    name: str
    family: str  # "flux" or "wan"
    params: dict  # the arguments of ComfyUI's model class (comfy.ldm.flux.model.Flux or comfy.ldm.wan.model.WanModel)
    detected: str  # the class ComfyUI's model detection makes of it (comfy/supported_models.py)
    latent: tuple  # (channels, spatial downscale, temporal downscale: 0 for images)
    text: tuple  # (tokens, width) of the text conditioning as the text encoder pads it
    pooled: int = 0  # FLUX.1's CLIP-L pooled vector
    guidance: bool = False  # a guidance embedding (FLUX.1-dev, FLUX.2 [dev])
    sizes: str = "1024"  # default --sizes
    tiny: tuple = ()  # (tiny maker, its arguments) for --tiny

    @property
    def heads(self) -> int:
        return self.params["num_heads"]

    @property
    def blocks(self) -> int:
        p = self.params
        return p["num_layers"] if self.family == "wan" else p["depth"] + p["depth_single_blocks"]

    def module(self) -> torch.nn.Module:
        """ComfyUI's model class with these arguments, on the meta device (no memory)."""
        import comfy.ops

        with torch.device("meta"):
            if self.family == "wan":
                from comfy.ldm.wan.model import WanModel

                return WanModel(**self.params, operations=comfy.ops.disable_weight_init)
            import comfy.ldm.flux.model as flux

            flux2 = {"image_model": "flux2"} if self.params.get("global_modulation") else {}
            return flux.Flux(**flux2, **synthetic._fields(flux.FluxParams, self.params),
                             operations=comfy.ops.disable_weight_init)

    def meta_state_dict(self) -> dict:
        return self.module().state_dict()

    def tiny_state_dict(self) -> dict:
        make, kw = self.tiny
        return make(**kw)

    def latent_shape(self, width: int, height: int, frames: int, batch: int = 1) -> tuple:
        channels, down, time = self.latent
        if time:  # EmptyHunyuanLatentVideo / Wan22ImageToVideoLatent: (length - 1) / 4 + 1 latent frames
            return (batch, channels, (frames - 1) // time + 1, height // down, width // down)
        return (batch, channels, height // down, width // down)

    def tokens(self, width: int, height: int, frames: int) -> int:
        """Tokens of the sequence-parallel attention per call: FLUX's text + image, Wan's video (its
        cross-attention to the text is not split)."""
        shape = self.latent_shape(width, height, frames)
        patch = 2 if self.family == "wan" or not self.params.get("global_modulation") else 1
        image = (shape[-1] // patch) * (shape[-2] // patch) * (shape[2] if len(shape) == 5 else 1)
        return image if self.family == "wan" else image + self.text[0]


WAN21_14B = dict(model_type="t2v", in_dim=16, out_dim=16, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40,
                 text_dim=4096, freq_dim=256, eps=1e-6)
WAN22_TI2V_5B = dict(WAN21_14B, in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30)

MODELS = {m.name: m for m in (
    BenchModel("flux1-dev", "flux", synthetic.FLUX_DEV, "Flux", (16, 8, 0), (512, 4096), pooled=768, guidance=True,
               sizes="1024,2048", tiny=(synthetic.tiny_flux, dict(heads=2, depth=2, single=2))),
    BenchModel("flux2-dev", "flux", synthetic.FLUX2_DEV, "Flux2", (128, 16, 0), (512, 15360), guidance=True,
               tiny=(synthetic.tiny_flux2, dict(layout="dev", heads=2))),
    BenchModel("flux2-klein-4b", "flux", synthetic.FLUX2_KLEIN, "Flux2", (128, 16, 0), (512, 7680),
               tiny=(synthetic.tiny_flux2, dict(layout="klein", heads=2))),
    BenchModel("wan2.1-14b", "wan", WAN21_14B, "WAN21_T2V", (16, 8, 4), (512, 4096), sizes="480p,720p",
               tiny=(synthetic_wan.tiny_wan, dict(layout="2.1-t2v", heads=2, layers=2))),
    BenchModel("wan2.2-ti2v-5b", "wan", WAN22_TI2V_5B, "WAN22_T2V", (48, 16, 4), (512, 4096), sizes="480p,720p",
               tiny=(synthetic_wan.tiny_wan, dict(layout="2.2-ti2v-5b", heads=2, layers=2))),
)}
NAMED_SIZES = {"480p": (832, 480), "720p": (1280, 720)}  # Wan's own resolutions


def size(label: str) -> tuple[int, int]:
    """--sizes entry -> (width, height): "1024" (square), "832x480", or "480p" / "720p"."""
    if label in NAMED_SIZES:
        return NAMED_SIZES[label]
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", label)
    if not m:
        raise ValueError(f"size {label!r}: a number (square), WxH, or one of {', '.join(NAMED_SIZES)}")
    return int(m.group(1)), int(m.group(2) or m.group(1))


def parameters(model: BenchModel) -> int:
    return sum(t.numel() for t in model.meta_state_dict().values())


# --- writing a file of synthetic weights, one tensor at a time ---------------------------------------------
_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}


def _value(name: str, shape, dtype, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    w = torch.empty(shape, dtype=torch.bfloat16 if dtype.itemsize == 1 else dtype, device=device)
    if name.endswith(("norm.weight", "norm.scale", "query_norm.weight", "key_norm.weight", "norm_q.weight",
                      "norm_k.weight")):
        w.fill_(1)
    else:
        w.normal_(0, 0.02, generator=g)
    return w.to(dtype)


def write(model: BenchModel, path: str, store: torch.dtype, device: str = "cuda", meta: dict | None = None) -> str:
    """The model's synthetic weights (or `meta`'s: name -> a tensor of the shape) as a safetensors file: matrices
    stored as `store` (bf16 or fp8), vectors and norms as bf16; each tensor generated on `device` and appended,
    so that host memory holds one at a time."""
    meta = model.meta_state_dict() if meta is None else meta
    dtypes = {k: store if t.ndim >= 2 and store.itemsize == 1 else torch.bfloat16 for k, t in meta.items()}
    header, offset = {"__metadata__": {"synthetic": model.name}}, 0
    for k, t in meta.items():
        n = t.numel() * dtypes[k].itemsize
        header[k] = {"dtype": _DTYPES[dtypes[k]], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    part = path + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(part, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for k, t in meta.items():
            w = _value(k, t.shape, dtypes[k], device).contiguous()
            f.write(w.view(torch.uint8).cpu().numpy().tobytes())
    os.replace(part, path)
    return path


def stored_dtype(model: BenchModel, weights: str, folder: str, choice: str = "auto") -> torch.dtype:
    """How the file stores the matrices: `choice` bf16 / fp8, or auto: bf16 where the disk holds it (with room to
    spare), else fp8 (then --weights bf16 loads it as bf16: the same compute, half the file)."""
    if choice != "auto":
        return torch.bfloat16 if choice == "bf16" else torch.float8_e4m3fn
    if weights == "fp8":
        return torch.float8_e4m3fn
    import shutil

    os.makedirs(folder, exist_ok=True)
    return torch.bfloat16 if shutil.disk_usage(folder).free > 1.25 * 2 * parameters(model) else torch.float8_e4m3fn


def synthetic_file(model: BenchModel, folder: str, tiny: bool, store: torch.dtype, device: str = "cuda") -> str:
    """The file of `model` in `folder`, written once (tiny: fp32 from torch's own initialisation)."""
    tag = "tiny" if tiny else {torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8"}[store]
    path = os.path.join(folder, f"{model.name}_synthetic_{tag}.safetensors")
    if not os.path.exists(path):
        if tiny:
            synthetic.save(model.tiny_state_dict(), path)
        else:
            write(model, path, store, device)
    return path


def conds(model: BenchModel, tiny: bool) -> list:
    """Positive and negative conditioning as the text encoders give them (tiny: FLUX's 32-wide text)."""
    tokens, width = (8, synthetic.TINY_CONTEXT_DIM) if tiny and model.family == "flux" else model.text
    tokens = 8 if tiny else tokens
    out = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, model.pooled, generator=g)} if model.pooled else {}
        if model.guidance:
            extra["guidance"] = 3.5
        out.append([[torch.randn(1, tokens, width, generator=g), extra]])
    return out


def lora_targets(model: BenchModel) -> dict:
    return {"targets": synthetic_wan.LORA_TARGETS} if model.family == "wan" else {}
