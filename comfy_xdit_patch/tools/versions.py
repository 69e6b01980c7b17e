"""The plugin against several ComfyUI trees: one row each (docs/versions.md).

    python -m comfy_xdit_patch.tools.versions TREE [TREE...]
    python -m comfy_xdit_patch.tools.versions --export GITDIR REV DEST

For each TREE that holds a ComfyUI, the CPU equivalence subset (SUBSET) runs with COMFYUI_PATH=TREE, one
tree at a time, and a row gives ComfyUI's version, commit, commit date and the result:
- "routed, equal": every test passed (they compare routed images with ComfyUI's own);
- "stepped aside: lacks ...": the plugin found seams missing (driver/seams.py), attached nothing, and
  tests/test_seams.py checked that ComfyUI runs as shipped with one log line;
- "FAILED: ...": a test failed, i.e. ComfyUI broke or an image differed (or the subset could not run);
- "skipped: ...": no ComfyUI at TREE.
Exits 1 if any tree FAILED, else 0.

Commit and date: `git -C TREE` when TREE is the top of a git checkout, else the stamp file
TREE/.comfyui-commit ("<sha> <ISO 8601 date>"), else "unknown". --export writes commit REV of a git
directory (a bare mirror will do; blobs it lacks are skipped and listed) into DEST, with that stamp.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys

from .. import locate  # standard library only

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUBSET = ("tests/test_seams.py", "tests/test_equivalence.py", "tests/test_workflows.py")
STAMP = ".comfyui-commit"
ASIDE = re.compile(r"steps aside on this ComfyUI: this ComfyUI lacks (.+?) \(comfy_xdit_patch needs")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True)
    except OSError:  # no git
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def stamp(tree: str) -> tuple[str, str]:
    """(commit, date) of a tree: its own git checkout, else its stamp file, else ("unknown", "")."""
    top = _git("-C", tree, "rev-parse", "--show-toplevel")
    if top and os.path.realpath(top) == os.path.realpath(tree):  # not a folder inside some other checkout
        line = _git("-C", tree, "log", "-1", "--format=%H %cI")
    else:
        try:
            with open(os.path.join(tree, STAMP)) as f:
                line = f.readline()
        except OSError:
            line = None
    sha, _, date = (line or "").strip().partition(" ")
    return (sha[:8], date[:10]) if sha else ("unknown", "")


def version(tree: str) -> str:
    try:
        with open(os.path.join(tree, "comfyui_version.py")) as f:
            m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read())
    except OSError:
        m = None
    return "v" + m.group(1) if m else "?"


def classify(returncode: int, output: str) -> tuple[str, bool]:
    """pytest's exit status and output -> (result, whether the tree is fine)."""
    if returncode == 0:
        aside = ASIDE.search(output)
        if aside:
            return f"stepped aside: lacks {aside.group(1)}", True
        passed = re.search(r"(\d+) passed", output)
        if passed:
            return f"routed, equal ({passed.group(1)} passed)", True
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    why = ", ".join(failed[:3]) or ("no test passed" if returncode == 0 else f"pytest exited {returncode}")
    return f"FAILED: {why}", False


def check(tree: str, python: str, timeout: float) -> tuple[str, bool]:
    if not locate.is_comfyui(tree):
        return f"skipped: no ComfyUI at {tree}", True
    env = dict(os.environ, COMFYUI_PATH=os.path.abspath(tree))
    cmd = [python, "-m", "pytest", *SUBSET, "-x", "-q", "-rfEs", "-p", "no:cacheprovider"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # a timeout ends its ranks too
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return f"FAILED: still running after {timeout:.0f} s", False
    return classify(proc.returncode, output)


def export(gitdir: str, rev: str, dest: str) -> list[str]:
    """Write commit `rev` of `gitdir` into `dest` with its stamp; the paths whose blobs the directory lacks."""
    line = _git("--git-dir", gitdir, "log", "-1", "--format=%H %cI", rev)
    if line is None:
        raise SystemExit(f"{rev}: no such commit in {gitdir}")
    listing = subprocess.run(["git", "--git-dir", gitdir, "ls-tree", "-r", "-z", line.split()[0]],
                             capture_output=True, check=True).stdout
    cat = subprocess.Popen(["git", "--git-dir", gitdir, "cat-file", "--batch"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)
    missing = []
    for entry in filter(None, listing.split(b"\0")):
        meta, path = entry.split(b"\t", 1)
        mode, kind, sha = meta.split()
        if kind != b"blob":  # submodules (ComfyUI has none, nor symbolic links)
            continue
        cat.stdin.write(sha + b"\n")
        cat.stdin.flush()
        header = cat.stdout.readline().split()
        if header[1] == b"missing":
            missing.append(path.decode())
            continue
        data = cat.stdout.read(int(header[2]))
        cat.stdout.read(1)
        target = os.path.join(dest, path.decode())
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
        if mode == b"100755":
            os.chmod(target, 0o755)
    cat.communicate()
    with open(os.path.join(dest, STAMP), "w") as f:
        f.write(line + "\n")
    return missing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="comfy_xdit_patch.tools.versions", description=__doc__.split("\n")[0])
    p.add_argument("trees", nargs="*", metavar="TREE")
    p.add_argument("--export", nargs=3, metavar=("GITDIR", "REV", "DEST"))
    p.add_argument("--python", default=sys.executable, help="the Python that runs the subset (e.g. a venv's)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per tree")
    a = p.parse_args(argv)
    if a.export:
        missing = export(*a.export)
        print(f"exported {stamp(a.export[2])[0]} to {a.export[2]}; {len(missing)} blob(s) missing: {missing}")
        return 0
    print("| ComfyUI | commit | date | result | tree |\n|---|---|---|---|---|")
    broken = False
    for tree in a.trees:
        result, ok = check(tree, a.python, a.timeout)
        broken |= not ok
        sha, date = stamp(tree) if locate.is_comfyui(tree) else ("", "")
        print(f"| {version(tree) if sha else ''} | {sha} | {date} | {result} | {tree} |", flush=True)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
