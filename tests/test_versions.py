"""The ComfyUI version matrix runner (comfy_xdit_patch/tools/versions.py): reading a tree's commit, the
results it reads from pytest, skipped trees, its exit status. Nothing here runs ComfyUI."""
import os
import subprocess

import pytest

from comfy_xdit_patch.driver import seams
from comfy_xdit_patch.tools import versions

SHA = "a88e02b18576283b1ff25a4b564548c5dc42cbf6"


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                   cwd=cwd, check=True, capture_output=True)


def _comfyui(path, version="0.23.0"):
    """A folder locate.is_comfyui accepts."""
    os.makedirs(path / "comfy", exist_ok=True)
    (path / "main.py").write_text("")
    (path / "comfy" / "model_management.py").write_text("")
    (path / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    return path


@pytest.mark.parametrize("rc,output,want,ok", [
    (0, "....\n34 passed, 3 deselected in 35.37s\n", "routed, equal (34 passed)", True),
    (0, "SKIPPED [2] tests/test_workflows.py:262: comfy_xdit_patch steps aside on this ComfyUI: "
        f"{seams.Missing(['comfy.model_management.unload_model_and_clones'])}\n"  # as conftest.py words it
        "3 passed, 31 skipped, 3 deselected in 3.26s\n",
     "stepped aside: lacks comfy.model_management.unload_model_and_clones", True),
    (1, "FAILED tests/test_equivalence.py::test_ksampler_matches_comfyui[divisible] - AssertionError: routed\n"
        "1 failed, 2 passed in 9s\n", "FAILED: tests/test_equivalence.py::test_ksampler_matches_comfyui[divisible]",
     False),
    (1, "ERROR tests/test_workflows.py::test_controlnet - TypeError\n1 error in 2s\n",
     "FAILED: tests/test_workflows.py::test_controlnet", False),
    (4, "ERROR: file or directory not found\n", "FAILED: pytest exited 4", False),
    (0, "34 skipped in 1s\n", "FAILED: no test passed", False),  # skipped for another reason: nothing shown
])
def test_results_read_from_pytest(rc, output, want, ok):
    assert versions.classify(rc, output) == (want, ok)


def test_commit_from_the_stamp_file_not_an_enclosing_checkout(tmp_path):
    _git(tmp_path, "init", "-q")
    tree = _comfyui(tmp_path / "ComfyUI-a88e02b1")  # inside a checkout, not the top of one
    assert versions.stamp(str(tree)) == ("unknown", "")
    (tree / versions.STAMP).write_text(f"{SHA} 2026-06-01T13:05:25-04:00\n")
    assert versions.stamp(str(tree)) == ("a88e02b1", "2026-06-01")
    assert versions.version(str(tree)) == "v0.23.0"


def test_commit_of_a_checkout_and_export(tmp_path):
    repo = _comfyui(tmp_path / "repo")
    (repo / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(repo / "run.sh", 0o755)
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "c")
    sha, date = versions.stamp(str(repo))
    assert len(sha) == 8 and len(date) == 10
    dest = tmp_path / "exported"
    assert versions.export(str(repo / ".git"), "HEAD", str(dest)) == []
    assert versions.stamp(str(dest)) == (sha, date)  # from the stamp file it wrote
    assert (dest / "main.py").exists() and os.access(dest / "run.sh", os.X_OK)


def test_absent_trees_are_skipped_and_only_a_failed_tree_fails_the_run(tmp_path, monkeypatch, capsys):
    absent, good, bad = str(tmp_path / "nowhere"), str(_comfyui(tmp_path / "good")), str(_comfyui(tmp_path / "bad"))
    monkeypatch.setattr(versions, "check", lambda tree, python, timeout: (
        ("FAILED: tests/x.py::t", False) if tree == bad else
        ("skipped: no ComfyUI at " + tree, True) if tree == absent else ("routed, equal (3 passed)", True)))
    assert versions.main([absent, good]) == 0
    assert versions.main([good, bad]) == 1
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ") and "tree |" not in r]
    assert rows[0] == f"|  |  |  | skipped: no ComfyUI at {absent} | {absent} |"
    assert rows[1] == f"| v0.23.0 | unknown |  | routed, equal (3 passed) | {good} |"
    assert "FAILED" in rows[3]


def test_an_absent_tree_runs_nothing(tmp_path):
    assert versions.check(str(tmp_path / "nowhere"), "/nonexistent/python", 1) == (
        f"skipped: no ComfyUI at {tmp_path / 'nowhere'}", True)
