"""The package as pip installs it: `pip install .` into a fresh virtual environment gives a working
`comfy-xdit` command (every subpackage shipped, the demo's custom nodes included)."""
import os
import shutil
import subprocess
import sys
import sysconfig

from conftest import REPO


def test_pip_install_gives_a_working_command(tmp_path):
    src = tmp_path / "src"  # pip builds in the source tree: a copy keeps the checkout clean
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "build", "*.egg-info", ".devkit",
                                                             ".whl", "bench_out"))
    prefix = tmp_path / "prefix"
    # NOTE: into a prefix with this environment's own pip and setuptools (no build isolation: no network); a
    # venv with --system-site-packages would see the base interpreter's packages instead of this environment's
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--prefix", str(prefix), str(src)], check=True, cwd=tmp_path)
    site = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    env = dict({k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, PYTHONPATH=site)
    out = subprocess.run([str(prefix / "bin" / "comfy-xdit"), "demo", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--checkpoint" in out.stdout
    subpackages = ["driver", "group", "wire", "rank", "rank.attention", "plans", "tools", "tools.demo_nodes"]
    code = ("import importlib.util\nfor s in %r: print(importlib.util.find_spec('comfy_xdit_patch.' + s).origin)"
            % subpackages)
    where = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert len(where) == len(subpackages) and all(w.startswith(str(prefix)) for w in where), where  # installed
