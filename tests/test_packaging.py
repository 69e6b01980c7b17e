"""The package as pip installs it: `pip install .` into a fresh virtual environment gives a working
`comfy-xdit` command (every subpackage shipped, the demo's custom nodes included)."""
import os
import shutil
import subprocess
import sys

from conftest import REPO


def test_pip_install_gives_a_working_command(tmp_path):
    src = tmp_path / "src"  # pip builds in the source tree: a copy keeps the checkout clean
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "build", "*.egg-info", ".devkit",
                                                             ".whl", "bench_out"))
    venv = tmp_path / "venv"
    # NOTE: the environment's own pip, setuptools, torch and ray are reused (system site packages); only this
    # project installs into the new environment
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", str(src)], check=True, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(venv / "bin" / "comfy-xdit"), "demo", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--checkpoint" in out.stdout
    where = subprocess.run([str(py), "-c", "import comfy_xdit_patch.tools.demo_nodes as m, os; print(m.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
