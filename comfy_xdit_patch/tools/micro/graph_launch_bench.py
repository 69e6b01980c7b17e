"""Does the GPU wait while the CPU launches a big CUDA graph? (one GPU, torch only)

A stand-in for a rank's model call: `--kernels` small kernels (elementwise ops on a 2304 x 3072 bf16
tensor) with a 2304 x 3072 x 3072 matmul every 10th, captured as 1, 2, 4 or 8 graphs that are launched
one after another. For each: the CPU time until every graph is launched, the GPU span between CUDA
events around the launches, and the plain sum of the kernels (one eager run, timed on the GPU).
If the span is the kernels plus the launch time, the GPU waits for the launch and cutting helps.

    python tools/graph_launch_bench.py [--kernels 2700]
"""
import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", type=int, default=2700)
    a = ap.parse_args()
    x = torch.randn(2304, 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3072, 3072, device="cuda", dtype=torch.bfloat16) * 0.01

    def work(lo, hi, t):
        for i in range(lo, hi):
            t = t @ w if i % 10 == 0 else t * 0.999 + 0.001
        return t

    def span(fn):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        e0.record()
        t0 = time.perf_counter()
        fn()
        queued = time.perf_counter() - t0
        e1.record()
        torch.cuda.synchronize()
        return queued * 1e3, e0.elapsed_time(e1)

    work(0, a.kernels, x)
    _, eager = span(lambda: work(0, a.kernels, x))
    for pieces in (1, 2, 4, 8):
        pool, gs, t = torch.cuda.graph_pool_handle(), [], x
        stream = torch.cuda.Stream()
        torch.cuda.synchronize()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for p in range(pieces):
                g = torch.cuda.CUDAGraph()
                g.capture_begin(pool=pool)
                t = work(a.kernels * p // pieces, a.kernels * (p + 1) // pieces, t)
                g.capture_end()
                gs.append(g)
        torch.cuda.current_stream().wait_stream(stream)

        def replay():
            for g in gs:
                g.replay()

        replay()
        runs = [span(replay) for _ in range(5)]
        queued, gpu = (sorted(r[i] for r in runs)[2] for i in (0, 1))
        print(json.dumps({"kernels": a.kernels, "graphs": pieces, "queued_ms": round(queued, 2),
                          "gpu_span_ms": round(gpu, 2), "eager_span_ms": round(eager, 2)}), flush=True)


if __name__ == "__main__":
    main()
