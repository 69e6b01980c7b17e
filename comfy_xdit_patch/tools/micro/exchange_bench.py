"""2-GPU Ulysses exchange micro-benchmark (torch only, no ComfyUI): NCCL all-to-all (with NCCL env
variants) vs copy-engine writes into the peer's memory through torch symmetric memory + barrier, as
attention.exchange.PeerCopy does. 228 exchanges a step (q, k, v, out x 57 FLUX blocks) of the per-rank
sizes of 1024² and 2048² on 2 ranks; eager, inside a CUDA graph, and beside a matmul load on another
stream. One fresh process pair per variant. Writes JSON lines to $OUT/a2a.jsonl (default /tmp).

    python tools/exchange_bench.py [variant ...]     # on a machine with 2 GPUs; variants: nccl, nccl_min32,
        nccl_min32_chunk1M, nccl_simple, symm (one copy), symm2 / symm4 (the copy cut over 2 / 4 streams),
        symm_sm (the copy as a kernel's stores)
"""
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

OUT = os.environ.get("OUT", "/tmp")
TOKENS = {"1024": 2304, "2048": 8448}  # per-rank tokens (txt 512 + img), 2-way
HIDDEN = 24 * 128
PER_STEP = 228


def log(rec):
    print(json.dumps(rec), flush=True)
    with open(os.path.join(OUT, "a2a.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def timeit(fn, reps, sync):
    fn(); sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def child(rank, variant, env, port, onevis, q):
    try:
        os.environ.update(env)
        if onevis:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)
            dev = torch.device("cuda", 0)
        else:
            dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, device_id=dev)
        peer = 1 - rank
        res = {}
        symm = None
        for size, tok in TOKENS.items():
            n = tok * HIDDEN // 2  # elements per destination
            send = torch.randn(2, n, device=dev, dtype=torch.bfloat16)
            recv = torch.empty_like(send)
            if variant.startswith("symm"):
                import torch.distributed._symmetric_memory as sm
                buf = sm.empty(2 * 2 * n, dtype=torch.bfloat16, device=dev)  # 2 alternating buffers x 2 src slots
                hdl = sm.rendezvous(buf, dist.group.WORLD.group_name)
                remote = [hdl.get_buffer(peer, (n,), torch.bfloat16, (b * 2 + rank) * n) for b in range(2)]
                local = [buf[(b * 2 + peer) * n:(b * 2 + peer + 1) * n] for b in range(2)]
                state = [0]
                # symmN: each copy cut into N slices on N streams (more copy engines at once?);
                # symm_sm: the copy is an elementwise kernel storing into the peer's memory (SMs, not copy engines)
                split = int(variant[4:]) if variant[4:].isdigit() else 1
                streams = [torch.cuda.Stream() for _ in range(split)]

                def one():
                    b = state[0] = state[0] ^ 1
                    if variant == "symm_sm":
                        torch.mul(send[peer], 1, out=remote[b])
                    elif split == 1:
                        remote[b].copy_(send[peer])
                    else:
                        main = torch.cuda.current_stream()
                        for i, (dst, src) in enumerate(zip(remote[b].chunk(split), send[peer].chunk(split))):
                            streams[i].wait_stream(main)
                            with torch.cuda.stream(streams[i]):
                                dst.copy_(src)
                        for st in streams:
                            main.wait_stream(st)
                    hdl.barrier(channel=b)
                    return local[b]
            else:
                def one():
                    dist.all_to_all_single(recv, send)
                    return recv

            def step():
                for _ in range(PER_STEP):
                    one()

            sync = torch.cuda.synchronize
            # correctness: what arrived from the peer is the peer's piece for me
            got = one().clone() if variant.startswith("symm") else one()[peer].clone()
            sync()
            allsend = [torch.empty_like(send) for _ in range(2)]
            dist.all_gather(allsend, send)
            ok = torch.equal(got, allsend[peer][rank])
            eager = timeit(step, 3, sync)
            try:
                g = torch.cuda.CUDAGraph()
                sync()
                with torch.cuda.graph(g):
                    step()
                graph = timeit(g.replay, 5, sync)
            except Exception as e:
                graph = f"{type(e).__name__}: {str(e)[:200]}"
            # overlap with a matmul load on another stream (eager), as a ulysses rank would see it
            w = torch.randn(HIDDEN, 4 * HIDDEN, device=dev, dtype=torch.bfloat16)
            x = torch.randn(tok, HIDDEN, device=dev, dtype=torch.bfloat16)

            def mm():
                for _ in range(PER_STEP):
                    x @ w

            t_mm = timeit(mm, 3, sync)
            side = torch.cuda.Stream()

            def both():
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    mm()
                step()
                torch.cuda.current_stream().wait_stream(side)

            t_both = timeit(both, 3, sync)
            res[size] = {"ok": ok, "eager_ms": eager * 1e3, "graph_ms": graph * 1e3 if isinstance(graph, float) else graph,
                         "mm_ms": t_mm * 1e3, "both_ms": t_both * 1e3, "mb": n * 2 / 1e6}
            del send, recv
        dist.barrier()
        if rank == 0:
            q.put({"variant": variant, "onevis": onevis, "env": env, **res})
        dist.destroy_process_group()
    except Exception:
        q.put({"variant": variant, "onevis": onevis, "rank": rank, "error": traceback.format_exc()[-1500:]})


def main():
    variants = [
        ("nccl", {}, False),
        ("nccl", {}, True),
        ("nccl_min32", {"NCCL_MIN_P2P_NCHANNELS": "32"}, True),
        ("nccl_min32_chunk1M", {"NCCL_MIN_P2P_NCHANNELS": "32", "NCCL_P2P_NVL_CHUNKSIZE": "1048576"}, True),
        ("nccl_simple", {"NCCL_PROTO": "Simple"}, True),
        ("symm", {}, True),
        ("symm", {}, False),
        ("symm2", {}, False),
        ("symm4", {}, False),
        ("symm_sm", {}, False),
    ]
    if len(sys.argv) > 1:
        variants = [v for v in variants if v[0] in sys.argv[1:]]
    ctx = mp.get_context("spawn")
    for i, (name, env, onevis) in enumerate(variants):
        q = ctx.Queue()
        procs = [ctx.Process(target=child, args=(r, name, env, 29600 + i, onevis, q)) for r in range(2)]
        for p in procs:
            p.start()
        try:
            rec = q.get(timeout=120)
        except Exception:
            rec = {"variant": name, "onevis": onevis, "error": "timeout"}
        log(rec)
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()


if __name__ == "__main__":
    main()
