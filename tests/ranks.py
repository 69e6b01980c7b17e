"""Run a function on N CPU ranks (gloo), each in its own process, without Ray: sharding unit tests."""
from __future__ import annotations

import datetime
import os
import tempfile

import torch.multiprocessing as mp


def _entry(rank, world, init_file, fn, args):
    import torch.distributed as dist

    from comfy_xdit_patch import locate

    locate.import_comfy(cpu=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run(fn, world: int, *args) -> None:
    """fn(rank, world, *args) on `world` ranks; any rank's exception fails the caller."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(world, os.path.join(d, "rendezvous"), fn, args), nprocs=world, join=True)
