"""Profiles of model calls: where a step's GPU time goes (the benchmark's --kernel-profile) and, with
`table`, where its Python time goes (--profile).

`profiled(prefix)` runs a block under torch.profiler and writes `prefix.txt`: GPU time by kind of
kernel (matmul, attention, copies, communication, the rest) and the busiest kernels, plus
`prefix.json.gz` (a Chrome trace) when asked. Used on the ranks and on ComfyUI's side alike, so the
two tables compare directly.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import time

# kernel-name fragments, first match wins (lower case)
KINDS = (
    ("communication", ("nccl", "barrier", "symm", "memcpy peer", "memcpy ptop")),
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "wgmma")),
    ("copies", ("memcpy", "memset", "copy", "cat", "contiguous", "transpose")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KINDS if any(p in low for p in parts)), "other")


def summary(events) -> dict:
    """{kind: milliseconds} over the GPU kernels and copies of key_averages() `events`, plus 'total'."""
    out = {kind: 0.0 for kind, _ in KINDS}
    out["other"] = 0.0
    for e in events:
        us = getattr(e, "self_device_time_total", 0) or 0
        if us and e.device_type.name == "CUDA":
            out[kind_of(e.key)] += us / 1e3
    out["total"] = sum(out.values())
    return {k: round(v, 3) for k, v in out.items()}


@contextlib.contextmanager
def profiled(prefix: str, trace: bool = False):
    """Profile the block, its GPU work included (the device is synchronized before the profile ends)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    kinds = summary(events)
    kinds["wall"] = round(wall, 3)
    table = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=90)
    with open(prefix + ".txt", "w") as f:
        f.write("GPU ms by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()) + "\n\n" + table + "\n")
    if trace:
        prof.export_chrome_trace(prefix + ".json")
        with open(prefix + ".json", "rb") as src, gzip.open(prefix + ".json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(prefix + ".json")


def table(prof, rows: int = 40, sort: str = "tottime") -> str:
    """A cProfile.Profile's busiest functions, by their own time or another pstats key ("" for None)."""
    import io
    import pstats

    if prof is None:
        return ""
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(sort).print_stats(rows)
    return out.getvalue()
