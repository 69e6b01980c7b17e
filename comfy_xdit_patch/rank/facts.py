"""What a rank tells about itself: host, device and memory (part of its "stats" reply)."""
from __future__ import annotations

import os
import socket


def device_facts(torch, device) -> dict:
    """Host, device name and memory of this process's device (rank side; CPU ranks report their RSS)."""
    facts = {"host": socket.gethostname()}
    if device.type == "cuda":
        facts.update(gpu=torch.cuda.get_device_name(device), memory=torch.cuda.memory_allocated(device),
                     memory_reserved=torch.cuda.memory_reserved(device),
                     memory_peak=torch.cuda.max_memory_allocated(device))
    else:
        import resource

        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        facts.update(gpu=None, memory=rss, memory_peak=max(peak, rss))
    return facts
