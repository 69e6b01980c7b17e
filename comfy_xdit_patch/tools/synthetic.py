"""Stand-in weights in ComfyUI's own formats, for the demo, the benchmark and the tests.

Shapes and key names come from ComfyUI's own module classes (built on the meta device), so ComfyUI
detects the files as what they imitate: FLUX.1-dev (11.9 B parameters), a tiny FLUX (hidden size
128 x heads), FLUX.2 [dev] and [klein] layouts (tiny ones too), a TAESD-style VAE for 16-channel latents and a
tiny FLUX.1-shaped KL VAE decoder.
"""
from __future__ import annotations

import dataclasses
import os
import zlib

import torch

FLUX_DEV = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000,
                patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
# FLUX.2 [dev] as ComfyUI detects it (comfy/model_detection.py: `double_stream_modulation_img` -> "flux2"):
# 32 B parameters, 128 latent channels at patch 1, 4-axis RoPE, modulation shared by all blocks, no biases.
FLUX2_DEV = dict(in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=15360, hidden_size=6144,
                 mlp_ratio=3.0, num_heads=48, depth=8, depth_single_blocks=48, axes_dim=[32, 32, 32, 32], theta=2000,
                 patch_size=1, qkv_bias=False, guidance_embed=True, txt_ids_dims=[3], global_modulation=True,
                 mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0)
# FLUX.2 [klein] 4B: the same class, detected as Flux2 too; no guidance embedding, Qwen3-4B text (3 x 2560)
FLUX2_KLEIN = dict(FLUX2_DEV, context_in_dim=7680, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20,
                   guidance_embed=False)
FLUX2_LAYOUTS = {"dev": FLUX2_DEV, "klein": FLUX2_KLEIN}
TINY_CONTEXT_DIM = 32


def _fields(params_cls, params: dict) -> dict:
    """`params` less the keys this ComfyUI's params dataclass doesn't have (older ones lack txt_ids_dims)."""
    known = {f.name for f in dataclasses.fields(params_cls)}
    return {k: v for k, v in params.items() if k in known}


def tiny_flux(heads: int = 2, depth: int = 1, single: int = 2, context_dim: int = TINY_CONTEXT_DIM,
              seed: int = 0, **overrides) -> dict:
    """A FLUX-dev-shaped model small enough for a CPU, with torch's default initialisation (fp32)."""
    import comfy.ldm.flux.model as flux

    params = dict(FLUX_DEV, hidden_size=128 * heads, num_heads=heads, depth=depth, depth_single_blocks=single,
                  context_in_dim=context_dim)
    params.update(overrides)
    torch.manual_seed(seed)
    model = flux.Flux(**_fields(flux.FluxParams, params), operations=torch.nn)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def tiny_flux2(layout: str = "dev", heads: int = 2, depth: int | None = None, single: int | None = None,
               context_dim: int = TINY_CONTEXT_DIM, seed: int = 0, **overrides) -> dict:
    """A FLUX.2-shaped model for a CPU: `layout` "dev" (2 double + 3 single blocks, guidance) or "klein"
    (2 + 2, no guidance); every head is 128 wide, as ComfyUI's detection derives heads = hidden / 128."""
    import comfy.ldm.flux.model as flux

    tiny = {"dev": (2, 3), "klein": (2, 2)}[layout]
    params = dict(FLUX2_LAYOUTS[layout], hidden_size=128 * heads, num_heads=heads, context_in_dim=context_dim,
                  depth=tiny[0] if depth is None else depth, depth_single_blocks=tiny[1] if single is None else single)
    params.update(overrides)
    torch.manual_seed(seed)
    model = flux.Flux(image_model="flux2", **params, operations=torch.nn)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def flux_dev(device: str = "cuda", dtype=torch.bfloat16, seed: int = 0, params: dict = FLUX_DEV) -> dict:
    """FLUX.1-dev's exact keys and shapes (or `params`', e.g. FLUX2_DEV), random N(0, 0.02) weights, norm
    scales 1; built on `device`."""
    import comfy.ldm.flux.model as flux
    import comfy.ops

    with torch.device("meta"):
        flux2 = {"image_model": "flux2"} if params.get("global_modulation") else {}  # older ComfyUI: no such argument
        meta = flux.Flux(**flux2, **_fields(flux.FluxParams, params), operations=comfy.ops.disable_weight_init)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, t in meta.state_dict().items():
        w = torch.empty(t.shape, dtype=dtype, device=device)
        if name.endswith(("norm.weight", "norm.scale", "query_norm.weight", "key_norm.weight")):
            w.fill_(1)
        else:
            w.normal_(0, 0.02, generator=gen)
        out[name] = w
    return out


def taesd_vae(latent_channels: int = 16, seed: int = 0) -> dict:
    """A TAESD-format VAE (ComfyUI's VAELoader detects it) with random weights."""
    import comfy.taesd.taesd as taesd

    torch.manual_seed(seed)
    model = taesd.TAESD(latent_channels=latent_channels)
    for m in model.modules():  # ComfyUI's layers skip initialisation; torch's own does it
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.Conv2d.reset_parameters(m)
        elif isinstance(m, torch.nn.GroupNorm):
            torch.nn.GroupNorm.reset_parameters(m)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def kl_vae(latent_channels: int = 16, ch: int = 32, seed: int = 0) -> dict:
    """A FLUX.1-shaped KL VAE decoder (ComfyUI's model.Decoder: 16-channel latents, 8x, GroupNorm, mid-block
    attention) with `ch` base channels (128 in the released file; 32, the least GroupNorm's 32 groups allow).
    No encoder: ComfyUI sizes it at 128 channels whatever the file holds, so it stays as ComfyUI makes it
    (logged as missing keys) and is never used to decode."""
    from comfy.ldm.modules.diffusionmodules.model import Decoder

    torch.manual_seed(seed)
    model = Decoder(ch=ch, out_ch=3, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], in_channels=3,
                    resolution=256, z_channels=latent_channels)
    for m in model.modules():  # ComfyUI's layers skip initialisation; torch's own does it
        for base in (torch.nn.Conv2d, torch.nn.GroupNorm):
            if isinstance(m, base):
                base.reset_parameters(m)
        if isinstance(m, torch.nn.GroupNorm):  # not the identity, so that a wrong affine shows
            torch.nn.init.normal_(m.weight, 1.0, 0.2)
            torch.nn.init.normal_(m.bias, 0.0, 0.2)
    return {f"decoder.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}


def save(sd: dict, path: str) -> str:
    import safetensors.torch

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def lora(model_state_dict: dict, rank: int = 16, seed: int = 0, scale: float = 0.02,
         targets: tuple = ("qkv", "proj", "linear1", "linear2", "img_mlp.0", "txt_mlp.0")) -> dict:
    """A LoRA in the common lora_down/lora_up format for a FLUX state dict's attention and MLP layers,
    keyed as ComfyUI's LoraLoader expects ("diffusion_model." prefix)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in model_state_dict.items():
        if w.ndim != 2 or not key.endswith(".weight") or not any(f".{t}." in key for t in targets):
            continue
        base = "diffusion_model." + key[: -len(".weight")]
        out[base + ".lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * scale
        out[base + ".lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * scale
        out[base + ".alpha"] = torch.tensor(float(rank))
    return out


def tiny_controlnet(heads: int = 2, depth: int = 1, single: int = 1, context_dim: int = TINY_CONTEXT_DIM,
                    seed: int = 0) -> dict:
    """An XLabs-format Flux ControlNet (image hint), detected by ComfyUI's ControlNetLoader."""
    import comfy.ldm.flux.controlnet as cn
    import comfy.ldm.flux.model as flux

    params = dict(FLUX_DEV, hidden_size=128 * heads, num_heads=heads, depth=depth, depth_single_blocks=single,
                  context_in_dim=context_dim)
    torch.manual_seed(seed)
    model = cn.ControlNetFlux(operations=torch.nn, **_fields(flux.FluxParams, params))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # the released XLabs files name RMSNorm weights "scale", which is how ComfyUI recognises them
    return {(k[: -len("weight")] + "scale" if k.endswith(("query_norm.weight", "key_norm.weight")) else k): v
            for k, v in sd.items()}


def tiny_chroma(depth: int = 1, single: int = 1, context_dim: int = TINY_CONTEXT_DIM, seed: int = 0) -> dict:
    """Chroma as ComfyUI detects it; its modulation approximator fixes hidden size 3072 (24 heads)."""
    import comfy.ldm.chroma.model as chroma

    torch.manual_seed(seed)
    params = dict(in_channels=64, out_channels=64, context_in_dim=context_dim, hidden_size=3072, mlp_ratio=4.0,
                  num_heads=24, depth=depth, depth_single_blocks=single, axes_dim=[16, 56, 56], theta=10000,
                  patch_size=2, qkv_bias=True, in_dim=64, out_dim=3072, hidden_dim=5120, n_layers=5,
                  txt_ids_dims=[], vec_in_dim=None)
    model = chroma.Chroma(**_fields(chroma.ChromaParams, params), operations=torch.nn)
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def save_gguf(sd: dict, path: str, qtype: str = "Q8_0", arch: str = "flux") -> str:
    """A GGUF file as city96's ComfyUI-GGUF loads it (`gguf` package's writer): tensors keyed as the
    state dict, `general.architecture` set; 2-D weights whose rows fit the format's block are quantized
    to `qtype` (F16, Q8_0, Q4_K, ...), the rest stored F16 (matrices) or F32 (vectors).

    The `gguf` package has no K-quant quantizer: Q4_K / Q5_K blocks are made of random codes with small
    scales (valid blocks, other weights than `sd`'s; equivalence tests compare runs of one file).
    Q8_0 is quantized with torch where the tensors are (`q8_0`, a GPU writes FLUX.1-dev in seconds; the
    `gguf` package's numpy quantizer takes ~15 min for 12 B parameters on one core)."""
    import gguf

    q = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[q][0]
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, t in sd.items():
        t = t.detach()
        if t.ndim == 2 and key.endswith(".weight") and t.shape[-1] % block == 0:
            kind = q
        else:
            kind = gguf.GGMLQuantizationType.F16 if t.ndim > 1 else gguf.GGMLQuantizationType.F32
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = torch.float32 if kind == gguf.GGMLQuantizationType.F32 else torch.float16
            writer.add_tensor(key, t.to(dtype).cpu().numpy(), raw_dtype=kind)
        elif qtype == "Q8_0":
            writer.add_tensor(key, q8_0(t).cpu().numpy(), raw_dtype=kind)
        elif qtype in ("Q4_K", "Q5_K"):
            writer.add_tensor(key, _k_blocks(t.shape, kind, zlib.crc32(key.encode())), raw_dtype=kind)
        else:
            writer.add_tensor(key, gguf.quants.quantize(t.float().cpu().numpy(), kind), raw_dtype=kind)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _k_blocks(shape, kind, seed: int):
    """Random Q4_K / Q5_K blocks: each starts with its f16 scale and minimum (d, dmin), then codes."""
    import gguf
    import numpy as np

    block, size = gguf.GGML_QUANT_SIZES[kind]
    rows, blocks = shape[0], shape[1] // block
    out = np.random.default_rng(seed).integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    out[..., 0:4] = np.array([2e-5, 1e-4], dtype=np.float16).view(np.uint8)  # |w| < 0.02, as trained weights
    return out.reshape(rows, blocks * size)


def scaled_fp8(sd: dict, layout: str = "scaled_fp8") -> dict:
    """`sd` with every matrix stored float8_e4m3fn times a per-layer scale, as ComfyUI's quantized
    checkpoints are: `scaled_fp8` (the older marker key + `.scale_weight`) or `comfy_quant` (per-layer
    JSON config + `.weight_scale`, the mixed-precision layout)."""
    import json

    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)} if layout == "scaled_fp8" else {}
    for key, w in sd.items():
        if w.ndim != 2 or not key.endswith(".weight"):
            out[key] = w
            continue
        layer = key[: -len(".weight")]
        scale = (w.abs().max().float() / 448.0).clamp(min=1e-12)
        out[key] = (w.float() / scale).to(torch.float8_e4m3fn)
        if layout == "scaled_fp8":
            out[layer + ".scale_weight"] = scale.reshape(1)
        else:
            out[layer + ".weight_scale"] = scale.reshape(())
            conf = json.dumps({"format": "float8_e4m3fn"}).encode()
            out[layer + ".comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    return out


def q8_0(w: torch.Tensor) -> torch.Tensor:
    """GGML's Q8_0 blocks of a matrix, as uint8 rows: per 32 values, an f16 scale (max |x| / 127) and
    32 int8 codes rounded half away from zero (the format's reference rounding)."""
    rows = w.shape[0]
    blocks = w.float().reshape(rows, -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    x = blocks * inv
    codes = (torch.sign(x) * torch.floor(x.abs() + 0.5)).to(torch.int8)
    out = torch.cat([d.to(torch.float16).view(torch.uint8), codes.view(torch.uint8)], -1)
    return out.reshape(rows, -1)
