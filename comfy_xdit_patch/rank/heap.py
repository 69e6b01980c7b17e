"""A rank's process memory: glibc's heap and Python's cyclic GC, set for a long-lived server."""
from __future__ import annotations

import gc
import logging

log = logging.getLogger("comfy_xdit_patch.worker")


def fix_mmap_threshold() -> None:
    """glibc serves allocations from 128 KiB up with mmap, but after such a block is freed it raises that
    threshold to the block's size (up to 32 MiB), so the tensors of later requests (a LoRA's, a new size's
    activations) come from the heap, where freed holes are kept: a rank's memory crept up ~0.4 MiB a
    prompt on CPU (tools/soak.py: +1.7-2.2 % over 40 prompts; +0.3-0.4 % with the threshold fixed). Setting
    it fixes it (mallopt M_MMAP_THRESHOLD), as MALLOC_MMAP_THRESHOLD_ would from the process's start."""
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError) as e:
        log.info("glibc's mmap threshold left as it is (%s)", e)


def settle() -> None:
    """Collect, then move what the process holds now (ComfyUI, the model, compiled code, graphs) out of
    Python's cyclic GC, so its collections, which may start on any allocation, stop walking it in the
    middle of a call (gc.freeze, as long-running inference servers do after warm-up). Done when another
    model became current and after a call was captured as a new graph; replays allocate little."""
    gc.collect()
    gc.freeze()
