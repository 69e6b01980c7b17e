"""The per-step channel between ComfyUI's process and the ranks, on its own: two rank processes on
one host (shared memory) and as if across hosts (bytes to rank 0, which broadcasts them over gloo).
Every rank answers with what it received; tensors the driver keeps cross once, and cross again when
their values change."""
from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from comfy_xdit_patch.tools.diagnostics import RankProbe
from comfy_xdit_patch.wire.channel import SPIN_LEAD, SPIN_MAX, DriverChannel, WorkerChannel

WORLD = 2
# with XDIT_TEST_DEVICE=cuda the tensors live on the GPU on both sides (page-locked shared memory)
DEVICE = torch.device("cuda" if os.environ.get("XDIT_TEST_DEVICE") == "cuda" else "cpu")


def _rank(address, authkey, rank, shared, store, device, spin):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    ch = WorkerChannel(address, authkey, rank, device, lambda t: dist.broadcast(t, src=0), shared,
                       transient=("call",))
    probe = ch.probe = RankProbe()  # counts the tensor bytes that crossed
    ch.spin = SPIN_MAX if spin else 0.0
    held = None
    while True:
        try:
            seq, op, body = ch.recv()
        except EOFError:
            return
        if op == "hold":  # kept past the request, as a LoRA's tensors in a `prepare` are
            held = body
        ch.reply(seq, held if op == "show" else (body, probe.inbound_bytes))


@pytest.fixture(params=["one host", "one host, polling", "across hosts"])
def channel(request, tmp_path):
    """"polling": both sides poll instead of sleeping around the expected reply, as with GPU ranks."""
    if request.param == "across hosts" and DEVICE.type == "cuda":
        pytest.skip("the ranks' broadcast is gloo's, on CPU tensors")
    spin = request.param.endswith("polling")
    ch = DriverChannel(WORLD, host="127.0.0.1" if request.param == "across hosts" else None)
    if spin:
        ch.spin_lead = SPIN_LEAD
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(ch.address, ch.authkey, r, ch.shared, str(tmp_path / "store"), DEVICE,
                                             spin), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()

    def alive():  # a rank that died before it connected ends the wait at once, saying so
        dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode is not None]
        if dead:
            raise RuntimeError(f"rank {dead[0][0]} exited with {dead[0][1]} before it connected (its error is above)")

    ch.accept(120, alive)
    yield ch
    ch.close()
    for p in procs:
        p.join(10)


def test_tensors_cross_once_and_again_when_they_change(channel):
    g = torch.Generator().manual_seed(0)
    context = torch.randn(1, 64, 512, generator=g).bfloat16().to(DEVICE)  # 64 KiB: big enough to be kept
    other = torch.randn(1, 64, 512, generator=g).bfloat16().to(DEVICE)  # same shape, other values (a new prompt)
    pooled = torch.randn(1, 768, generator=g).to(DEVICE)  # too small to be worth keeping
    crossed = [0] * WORLD

    def step(context, expect_context_crosses: bool):
        x = torch.randn(1, 16, 8, 8, generator=g).to(DEVICE)
        sent = {"x": x, "args": (torch.tensor([0.5], device=DEVICE), context.clone()), "y": pooled, "n": 3}
        kept = sent["args"][1]
        replies = channel.request("call", sent, all_reply=True, keep=[kept, pooled], device=DEVICE)
        for rank, (got, total) in replies.items():
            assert got.keys() == sent.keys() and got["n"] == 3
            for a, b in ((got["x"], x), (got["args"][0], sent["args"][0]), (got["args"][1], context),
                         (got["y"], pooled)):
                assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
            grew, crossed[rank] = total - crossed[rank], total
            assert (grew >= context.numel() * 2) == expect_context_crosses, (rank, grew)

    step(context, True)
    step(context, False)  # a new tensor with the same values: from the ranks' cache
    step(other, True)  # same shape, changed values: crosses again
    step(context, False)  # both stay cached, whichever comes
    step(other, False)


def test_reply_lands_on_the_requested_device_and_keeps_its_dtype(channel):
    x = torch.arange(12, dtype=torch.float16, device=DEVICE).reshape(3, 4).t()  # not contiguous
    replies = channel.request("call", [x, None, "s"], all_reply=True, device=torch.device("cpu"))
    for got, _ in replies.values():
        assert got[1:] == [None, "s"] and got[0].dtype == torch.float16 and got[0].device.type == "cpu"
        assert torch.equal(got[0], x.cpu())


def test_what_a_rank_keeps_survives_later_calls(channel):
    """Only a model call's tensors may live in memory the next request reuses."""
    kept = torch.arange(4096, dtype=torch.float32, device=DEVICE)
    channel.request("hold", {"lora": kept}, all_reply=True)
    for _ in range(2):
        channel.request("call", torch.zeros(4096, device=DEVICE), all_reply=True)
    for got in channel.request("show", None, all_reply=True).values():
        assert torch.equal(got["lora"], kept.cpu())


def test_a_request_whose_tensors_are_all_cached(channel):
    """Nothing crosses after the first time (across hosts: no empty payload follows the header)."""
    context = torch.randn(1, 64, 512, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    for _ in range(3):
        sent = context.clone()
        for got, _ in channel.request("call", {"c": sent}, all_reply=True, keep=[sent]).values():
            assert torch.equal(got["c"].cpu(), context.cpu())


def test_a_new_tensor_never_takes_the_slot_of_one_read_in_the_same_request(channel):
    """Eight kept tensors fill the cache; a ninth comes first in the next request, beside the eight."""
    g = torch.Generator().manual_seed(4)
    kept = [torch.randn(1, 64 + i, 256, generator=g).to(DEVICE) for i in range(9)]
    for body in (kept[1:], kept[:1] + kept[1:]):
        sent = [t.clone() for t in body]
        for got, _ in channel.request("call", sent, all_reply=True, keep=sent).values():
            assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(got, body))


_SIDE = """
import sys
from comfy_xdit_patch.wire.transport import {cls}
import torch
box = {cls}({arg})
{setup}
print(name, flush=True)
sys.stdin.readline()  # the other side has removed the segment
box.close()
"""


@pytest.mark.parametrize("first", ["the rank", "the driver"])
def test_a_segment_the_other_side_removed_is_no_leak_at_exit(first, tmp_path):
    """Each side removes the segment (a rank its own, the driver a rank's it reads); whichever comes second finds it
    gone, and its process leaves without the resource tracker's warning of a leaked segment."""
    import subprocess
    import sys

    from comfy_xdit_patch.wire.transport import Inbox, Outbox

    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if first == "the rank":  # the driver, in its own process (as ComfyUI's beside Ray's), reads the rank's segment
        box = Outbox(shared=True)
        name = box.stage([torch.ones(8)])[1][1]
        code = _SIDE.format(cls="Inbox", arg="owns=True", setup=f"name = {name!r}; box.take(None, ('shm', name, 32))")
    else:  # the rank, in its own process, writes; the driver removes the segment first
        code = _SIDE.format(cls="Outbox", arg="shared=True", setup="name = box.stage([torch.ones(8)])[1][1]")
    # NOTE: a fresh interpreter, not a multiprocessing child: those share this process's resource tracker
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = other.stdout.readline().strip()
        if first == "the rank":
            box.close()
        else:
            box = Inbox(owns=True)
            box.take(None, ("shm", seen, 32))
            box.close()
        other.stdin.write("go\n")
        other.stdin.flush()
        _, err = other.communicate(timeout=60)
    finally:
        other.kill()
    assert other.returncode == 0, err
    assert "resource_tracker" not in err, err
