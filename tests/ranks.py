"""Run a function on N ranks, each in its own process, without Ray: sharding unit tests.

CPU ranks over gloo; with XDIT_TEST_DEVICE=cuda, one GPU per rank over NCCL (run on a GPU machine).
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile

import torch.multiprocessing as mp


DEVICE = os.environ.get("XDIT_TEST_DEVICE", "cpu")


def gpus() -> int:
    import torch

    return torch.cuda.device_count() if DEVICE == "cuda" else 0


def _entry(rank, world, init_file, fn, args):
    import torch
    import torch.distributed as dist

    from comfy_xdit_patch import locate

    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
    locate.import_comfy(cpu=DEVICE != "cuda")
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    fn(rank, world, *args)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    if DEVICE != "cuda":
        dist.destroy_process_group()
    # NOTE: the work is checked, so leave at once. An orderly exit can abort in C++ teardown: on CPU, "terminate
    # called without an active exception" after gloo's group was destroyed (about 1 run in 30 on a busy 2-core
    # machine); on CUDA, NCCL's teardown hung after yunchang's ring (4x H100).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(fn, world: int, *args) -> None:
    """fn(rank, world, *args) on `world` ranks; any rank's exception fails the caller."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(world, os.path.join(d, "rendezvous"), fn, args), nprocs=world, join=True)
