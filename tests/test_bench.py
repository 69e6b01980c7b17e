"""`comfy-xdit bench --tiny`: the side-by-side benchmark end to end on CPU ranks, its diagnostics
attached (per-call timing on the ranks, the exchange probe) and its table written."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow  # ~40 s: the bench starts its own Ray and group
def test_bench_runs_with_diagnostics_attached(tmp_path, router):
    router.close_group()  # this machine has 2 cores: the bench's ranks get them to themselves
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "comfy_xdit_patch.tools.cli", "bench", "--tiny", "--sizes", "64",
                           "--steps", "3", "--warmup", "2", "--ranks", "2", "--workdir", str(tmp_path),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=540,
                          env=dict(os.environ, COMFY_XDIT_START_TIMEOUT="300"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "bench.json").read_text())
    run, = results["runs"]
    assert run["routed_calls"] == 3 and run["psnr_db"] > 100  # the same latent as ComfyUI alone
    assert run["compute_s"] > 0 and run["a2a_s"] > 0  # timed on the ranks: diagnostics were attached
    assert "route" in run["dispatch_parts_ms"]
    assert (out / "bench.md").read_text().count("|") > 20


@pytest.mark.slow  # ~50 s each: the bench starts its own Ray and group
@pytest.mark.parametrize("model", ["flux2-dev", "wan2.1-14b"])
def test_bench_models_end_to_end(tmp_path, router, model):
    """`--model` on its tiny stand-in: both sides, the capped baseline (on a CPU: not applied, recorded so) and
    the ranks' peak RSS in the results."""
    router.close_group()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "comfy_xdit_patch.tools.cli", "bench", "--model", model, "--tiny",
                           "--steps", "2", "--warmup", "1", "--ranks", "2", "--gpu-cap", "4", "--baselines", "eager",
                           "--workdir", str(tmp_path), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=540, env=dict(os.environ, COMFY_XDIT_START_TIMEOUT="300"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "bench.json").read_text())
    run, = results["runs"]
    assert run["routed_calls"] == 2 and run["psnr_db"] > 100 and run["env"]["COMFY_XDIT_GPU_CAP"] == "4"
    assert len(run["rank_rss_peak_gib"]) == 2 and min(run["rank_rss_peak_gib"]) > 0
    assert [bool(b.get("capped")) for b in results["baseline"]] == [False, True]
    assert results["gpu_cap"] == {"gib": 4.0, "applied": None} and results["weights"]["model"] == model
    assert "capped at 4 GiB" in (out / "bench.md").read_text()


@pytest.mark.slow  # ~40 s each: the bench starts its own Ray and group
@pytest.mark.parametrize("vae", ["flux", "wan2.1"])
def test_bench_vae_times_both_decodes(tmp_path, router, vae):
    """`comfy-xdit bench-vae --tiny`: ComfyUI's decode and the ranks' on the same latent, every timed decode on the
    ranks, the same image."""
    router.close_group()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "comfy_xdit_patch.tools.cli", "bench-vae", "--vae", vae, "--tiny",
                           "--repeats", "1", "--ranks", "2", "--workdir", str(tmp_path), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=540,
                          env=dict(os.environ, COMFY_XDIT_START_TIMEOUT="300"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    alone, ranks = json.loads((out / "bench-vae.json").read_text())["rows"]
    assert alone["setup"] == "ComfyUI alone" and ranks["setup"] == "2 ranks" and ranks["routed"] == 2
    assert ranks["s"] > 0 and ranks["psnr_db"] > 60 and len(ranks["peak_gib"]) == 2
