"""What one routed model call costs beyond the ranks' work: the channel alone (no Ray, no ComfyUI).

ComfyUI's process (here: this one) sends call-shaped requests to N rank processes through
comfy_xdit_patch.channel, with the tensors of a FLUX call at 1024² where ComfyUI has them (on
cuda:0; the T5 context a new tensor of the same values each step, as ComfyUI's cond concat makes
it). Each rank "computes" for --compute-ms on its GPU (a sleep kernel), then rank 0 replies with a
latent-sized tensor from its GPU, as a replayed graph's output buffer. Printed per call (median and
mean, ms): the driver's send / wait / take, the ranks' copy-in and reply, the rest of the wait
(header transit, unpickling, wake-ups), and the dispatch (the call's wall time minus rank 0's busy
time, as `comfy-xdit bench` reports it). --profile adds cProfile tables of the driver and rank 0.

    python tools/dispatch_bench.py [--ranks 2] [--calls 300] [--compute-ms 20] [--profile]
        [--root DIR]   # import comfy_xdit_patch from DIR (to compare two versions on one machine)
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time


def _stats_text(profiler, n=25) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(n)
    return out.getvalue()


def rank_main(root, address, authkey, rank, world, compute_ms, profile, spin_ms):
    sys.path.insert(0, root)
    import torch

    from comfy_xdit_patch.tools.diagnostics import RankProbe
    from comfy_xdit_patch.wire.channel import WorkerChannel

    gpus = torch.cuda.device_count()
    device = torch.device("cuda", rank % gpus) if gpus else torch.device("cpu")
    if gpus:
        torch.cuda.set_device(device)
    ch = WorkerChannel(address, authkey, rank, device, lambda t: None, True)
    probe = ch.probe = RankProbe()
    if spin_ms is not None and hasattr(ch, "spin"):
        ch.spin = spin_ms / 1e3
    out = torch.zeros(1, 16, 128, 128, dtype=torch.bfloat16, device=device)  # a graph's output buffer
    cycles = 0
    if gpus:  # calibrate the sleep kernel
        torch.cuda._sleep(1_000_000)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.cuda._sleep(10_000_000)
        torch.cuda.synchronize()
        cycles = int(10_000_000 * compute_ms / 1e3 / (time.perf_counter() - t0))
    marks, busy = [], 0.0
    profiler = cProfile.Profile() if profile and rank == 0 else None
    while True:
        try:
            if profiler:
                profiler.enable()
            seq, op, body = ch.recv()
        except EOFError:
            return
        r1 = time.perf_counter()
        if op == "call":
            if gpus:
                torch.cuda._sleep(cycles)
                out.copy_(body[4][0])
                torch.cuda.synchronize(device)
            else:
                time.sleep(compute_ms / 1e3)
            busy = time.perf_counter() - r1
            if rank == 0:
                ch.reply(seq, out)
            marks.append((r1, busy, time.perf_counter()))
            if profiler:
                profiler.disable()
        elif op == "reset":
            marks.clear()
            probe.inbound_seconds = probe.reply_seconds = 0.0
            if profiler:
                profiler.disable()
                profiler = cProfile.Profile()
            ch.reply(seq, "ok")
        elif op == "stats":
            if profiler:
                profiler.disable()
            ch.reply(seq, {"marks": marks, "inbound": probe.inbound_seconds, "reply": probe.reply_seconds,
                           "profile": _stats_text(profiler) if profiler else ""})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--compute-ms", type=float, default=20.0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--root", default=os.path.abspath(os.path.join(os.path.dirname(__file__), *[".."] * 3)))
    ap.add_argument("--label", default="")
    ap.add_argument("--driver-spin-lead-ms", type=float, help="DriverChannel.spin_lead (-1: no spinning)")
    ap.add_argument("--rank-spin-ms", type=float, help="WorkerChannel.spin (0: no spinning)")
    a = ap.parse_args()
    sys.path.insert(0, a.root)
    import torch
    import torch.multiprocessing as mp

    from comfy_xdit_patch.wire import channel as channel_mod
    from comfy_xdit_patch.tools.diagnostics import DriverProbe
    from comfy_xdit_patch.wire.channel import DriverChannel

    gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    ch = DriverChannel(a.ranks)
    probe = ch.probe = DriverProbe()
    if gpu:
        ch.spin_lead = getattr(channel_mod, "SPIN_LEAD", None)
    if a.driver_spin_lead_ms is not None:
        ch.spin_lead = None if a.driver_spin_lead_ms < 0 else a.driver_spin_lead_ms / 1e3
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(a.root, ch.address, ch.authkey, r, a.ranks, a.compute_ms,
                                                 a.profile, a.rank_spin_ms), daemon=True) for r in range(a.ranks)]
    for p in procs:
        p.start()
    ch.accept(120, lambda: None)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, 16, 128, 128, generator=g, device=device).bfloat16()
    halves = [torch.randn(1, 256, 4096, generator=g, device=device).bfloat16() for _ in range(2)]
    y = torch.randn(1, 768, generator=g, device=device).bfloat16()

    def call():
        context = torch.cat(halves, dim=1)  # a new tensor each step, same values
        timestep = torch.full((1,), 0.5, device=device)
        guidance = torch.full((1,), 3.5, device=device)
        args = (x, timestep, context, y, guidance, None, None)
        kwargs = {"transformer_options": {"rope_options": None}}
        t0 = time.perf_counter()
        before = dict(probe.timing)
        ch.request("call", ("key", "flux", ("mesh", a.ranks), 1, args, kwargs), keep=[context, y],
                   device=device)
        t1 = time.perf_counter()
        return t0, t1, {k: v - before.get(k, 0.0) for k, v in probe.timing.items()}

    for _ in range(30):
        call()
    ch.request("reset", None, all_reply=True)
    profiler = cProfile.Profile() if a.profile else None
    rows = []
    if profiler:
        profiler.enable()
    for _ in range(a.calls):
        rows.append(call())
    if profiler:
        profiler.disable()
    ranks = ch.request("stats", None, all_reply=True)
    r0 = ranks[0]
    per = {"send": [], "wait": [], "take": [], "dispatch": [], "to_rank": [], "rank_reply": [], "back": []}
    for (t0, t1, parts), (r1, busy, r2) in zip(rows, r0["marks"]):
        per["send"].append(parts["send"])
        per["wait"].append(parts["wait"] - busy)
        per["take"].append(parts["take"])
        per["dispatch"].append(t1 - t0 - busy)
        per["to_rank"].append(r1 - (t0 + parts["send"]))  # header transit, unpickling and copy-in
        per["rank_reply"].append(r2 - r1 - busy)
        per["back"].append(t1 - parts["take"] - r2)  # reply transit and the driver's wake-up
    n = len(r0["marks"])
    summary = {k: {"median": round(statistics.median(v) * 1e3, 3), "mean": round(statistics.fmean(v) * 1e3, 3)}
               for k, v in per.items()}
    summary["rank_inbound_mean"] = round(max(r["inbound"] for r in ranks.values()) / n * 1e3, 3)
    rec = {"label": a.label, "ranks": a.ranks, "compute_ms": a.compute_ms, "calls": n,
           "gpu": torch.cuda.get_device_name(0) if gpu else "cpu", **summary}
    print(json.dumps(rec), flush=True)
    if a.profile:
        print("--- driver\n" + _stats_text(profiler) + "--- rank 0\n" + r0["profile"])
    ch.close()
    for p in procs:
        p.join(10)


if __name__ == "__main__":
    main()
