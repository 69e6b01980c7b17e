"""What a rank tells about itself: host, device and memory (part of its "stats" reply)."""
from __future__ import annotations

import socket


def host_memory() -> dict:
    """This process's host memory in bytes: resident now and at its peak, and of the resident, anonymous (its own)
    and file-backed (mapped files: the page cache, shared by the ranks of a host that map the same file)."""
    fields = {"VmRSS": "rss", "VmHWM": "rss_peak", "RssAnon": "rss_anon", "RssFile": "rss_file"}
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in fields:
                    out[fields[name]] = int(value.split()[0]) * 1024  # kB
    except OSError:  # not Linux
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        out["rss_peak"] = peak if peak > 2**32 else peak * 1024
    return out


def device_facts(torch, device) -> dict:
    """Host, device name and memory of this process's device (rank side; CPU ranks report their RSS), and its host
    memory (`host_memory`)."""
    facts = {"host": socket.gethostname(), "host_memory": host_memory()}
    if device.type == "cuda":
        facts.update(gpu=torch.cuda.get_device_name(device), memory=torch.cuda.memory_allocated(device),
                     memory_reserved=torch.cuda.memory_reserved(device),
                     memory_peak=torch.cuda.max_memory_allocated(device))
    else:  # a CPU rank's device is the host: its memory is the process's RSS
        host = facts["host_memory"]
        rss = host.get("rss", 0)
        facts.update(gpu=None, memory=rss, memory_peak=max(host.get("rss_peak", 0), rss))
    return facts


_RESERVE: dict = {}  # ComfyUI's own reserve before the first cap (its default or --reserve-vram)


def cap_memory(torch, mm, device, gib: float) -> dict | None:
    """Hold this process to `gib` GiB of its GPU, as on a card of that size: torch's per-process memory fraction
    (allocations beyond it fail), and ComfyUI's reserve (its --reserve-vram, EXTRA_RESERVED_VRAM) grown by what the
    cap takes away, so that its loading decisions (partial loading, offloading) are those of the smaller card.
    None on a CPU (nothing to cap)."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    cap = min(total, int(gib * 2**30))
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    base = _RESERVE.setdefault("bytes", mm.EXTRA_RESERVED_VRAM)
    mm.EXTRA_RESERVED_VRAM = base + (total - cap)
    return {"total": total, "cap": cap, "reserve": mm.EXTRA_RESERVED_VRAM}
