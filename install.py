#!/usr/bin/env python3
"""Install comfy_xdit_patch into the Python that runs ComfyUI, and register it with ComfyUI.

    python install.py                          # dependencies only (what ComfyUI-Manager runs)
    python install.py --comfyui ~/ComfyUI      # + ComfyUI's own requirements, + link into custom_nodes/
    python install.py --comfyui ~/ComfyUI --demo   # ... then run the built-in FLUX job
    python install.py --test                   # dependencies + test tools (what the test command runs)

Run it with ComfyUI's interpreter (the one `python main.py` uses).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from comfy_xdit_patch import locate  # noqa: E402  (standard library only)


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def ensure_torch() -> None:
    """ComfyUI needs torch, torchvision and torchaudio; pip's newest torchaudio may pin another torch,
    so it goes in last, without dependencies, on top of the torch that is there."""
    if not have("torch") or not have("torchvision"):
        pip("torch", "torchvision")
    if not have("torchaudio"):
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__.split('+')[0])"],
                             capture_output=True, text=True, check=True).stdout.strip()
        major_minor = ".".join(out.split(".")[:2])
        try:
            pip("--no-deps", f"torchaudio=={major_minor}.*")
        except subprocess.CalledProcessError:
            pip("--no-deps", "torchaudio")


def register(custom_nodes: str) -> None:
    os.makedirs(custom_nodes, exist_ok=True)
    if os.path.realpath(os.path.dirname(HERE)) == os.path.realpath(custom_nodes):
        print(f"already in {custom_nodes}")
        return
    link = os.path.join(custom_nodes, "comfy_xdit_patch")
    if os.path.islink(link) and os.path.realpath(link) == os.path.realpath(HERE):
        print(f"already linked: {link}")
        return
    if os.path.lexists(link):
        raise SystemExit(f"{link} exists and is not a link to {HERE}; remove it first")
    os.symlink(HERE, link)
    print(f"linked {link} -> {HERE}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", help="ComfyUI checkout to install requirements for and register with "
                                      "(default: COMFYUI_PATH, the ComfyUI around this folder, ~/ComfyUI)")
    ap.add_argument("--base-directory", help="ComfyUI --base-directory whose custom_nodes/ gets the link")
    ap.add_argument("--no-deps", action="store_true", help="don't pip install anything")
    ap.add_argument("--no-register", action="store_true", help="don't link into custom_nodes/")
    ap.add_argument("--test", action="store_true", help="also install the test tools")
    ap.add_argument("--demo", nargs=argparse.REMAINDER, help="then run the default job (args go to `cli demo`)")
    a = ap.parse_args()

    comfy = os.path.abspath(os.path.expanduser(a.comfyui)) if a.comfyui else locate.find_comfyui()
    if a.comfyui and not locate.is_comfyui(comfy):
        raise SystemExit(f"{comfy} is not a ComfyUI checkout (no comfy/model_management.py and main.py)")
    if not a.no_deps:
        ensure_torch()
        files = [os.path.join(comfy, "requirements.txt")] if comfy else []
        files.append(os.path.join(HERE, "requirements.txt"))
        if a.test:
            files.append(os.path.join(HERE, "requirements-test.txt"))
        pip(*[arg for f in files for arg in ("-r", f)])
    if comfy is None:
        print(locate.HOW_TO_GET, file=sys.stderr)
        if a.demo is not None or a.comfyui or a.base_directory:
            raise SystemExit(1)
    elif not a.no_register and (a.comfyui or a.base_directory):
        base = os.path.abspath(os.path.expanduser(a.base_directory)) if a.base_directory else comfy
        register(os.path.join(base, "custom_nodes"))
    if a.demo is not None:
        env = dict(os.environ, COMFYUI_PATH=comfy)
        raise SystemExit(subprocess.call([sys.executable, "-m", "comfy_xdit_patch.tools.cli", "demo", *a.demo],
                                         cwd=HERE, env=env))


if __name__ == "__main__":
    main()
