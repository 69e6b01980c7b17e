"""`comfy-xdit doctor` on this CPU machine, as a user runs it (a subprocess)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO


def doctor(*args, **env):
    run = subprocess.run([sys.executable, "-m", "comfy_xdit_patch.tools.cli", "doctor", *args], cwd=REPO,
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=600)
    return run.returncode, run.stdout


@pytest.mark.slow
def test_cpu_machine_is_healthy_and_says_what_works():
    rc, out = doctor()
    assert rc == 0, out
    assert "[ok]   ComfyUI: " in out and "[ok]   ComfyUI seams: " in out
    assert "[note] GPUs: none visible. What still works: COMFY_XDIT=1 routes FLUX to CPU ranks" in out
    assert "[ok]   /dev/shm: " in out and "[ok]   ray: " in out
    assert "[ok]   layout FLUX 1024x1024 cfg 1.0: cfg=1,ulysses=2,ring=1 on 2 ranks" in out
    assert "[ok]   layout FLUX 1024x1024 cfg 3.5: cfg=2,ulysses=1,ring=1 on 2 ranks" in out
    assert "[ok]   Ray cluster: private cluster on 127.0.0.1 started in " in out
    assert out.rstrip().endswith("no problems found")


def test_problems_say_what_to_do_and_fail():
    rc, out = doctor("--no-ray", COMFY_XDIT_WORKERS="5", COMFY_XDIT_ATTENTION="torch")
    assert rc == 1, out
    # 5 ranks can't split FLUX's 24 heads, and Ring needs yunchang on CUDA
    assert "[FAIL] layout FLUX 1024x1024 cfg 1.0: " in out and "what to do: use a rank count" in out
    assert "[note] Ray cluster: not started (--no-ray)" in out
    assert out.rstrip().endswith("problem(s)")


def test_bad_setting_is_a_problem():
    rc, out = doctor("--no-ray", COMFY_XDIT_FALLBACK="maybe")
    assert rc == 1, out
    assert "[FAIL] settings: COMFY_XDIT_FALLBACK='maybe' is not valid" in out
    assert "what to do: fix or unset COMFY_XDIT_FALLBACK" in out


def test_an_address_where_nothing_listens_is_a_problem_named():
    from comfy_xdit_patch.tools.headless import free_port

    address = f"127.0.0.2:{free_port()}"  # loopback, nothing there; Ray leaves 127.0.0.2 as it is
    rc, out = doctor(COMFY_XDIT_RAY_ADDRESS=address)
    assert rc == 1, out
    assert f"[FAIL] Ray cluster {address}: nothing listens at {address}" in out and "ray start --head" in out
