"""COMFY_XDIT_CACHE_DIR: compiled code reused across processes, keyed so nothing stale is read, and a
cache that can't be read costs a compile, never a failure."""
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from comfy_xdit_patch.rank import compile_cache
from conftest import REPO

# A child process that compiles one small function with the plugin's cache, as a rank does.
CHILD = textwrap.dedent("""
    import json, logging, sys
    sys.path.insert(0, {repo!r})
    logging.basicConfig(level=logging.WARNING)
    import torch
    from torch._dynamo.utils import counters
    from comfy_xdit_patch.rank import compile_cache
    folder = compile_cache.use(sys.argv[1], "cpu")
    f = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1, dynamic=False)
    x = torch.linspace(-2, 2, 64)
    ok = torch.allclose(f(x), torch.nn.functional.gelu(x) * 2 + 1)
    compile_cache.seal(folder)  # as a rank does after a call that compiled
    print(json.dumps({{"folder": folder, "ok": ok, "hits": counters["inductor"]["fxgraph_cache_hit"],
                      "misses": counters["inductor"]["fxgraph_cache_miss"]}}))
""")


def compile_in_child(root):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
    out = subprocess.run([sys.executable, "-c", CHILD.format(repo=REPO), str(root)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.slow  # ~50 s: three processes compile
def test_a_second_process_reuses_what_the_first_compiled_and_corrupt_artefacts_cost_a_compile(tmp_path):
    """Inductor fails on an artefact it can't read; a sealed file that changed empties the folder instead."""
    first, _ = compile_in_child(tmp_path)
    second, _ = compile_in_child(tmp_path)
    assert first["ok"] and second["ok"] and first["folder"] == second["folder"]
    assert first["misses"] >= 1 and second["hits"] >= 1 and second["misses"] == 0
    for folder, _, files in os.walk(first["folder"]):
        for name in files:
            if name not in ("stamp.json", "sealed.json"):  # the artefacts, not the records
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(b"\x00garbage")
    again, log = compile_in_child(tmp_path)
    assert again["ok"] and again["misses"] >= 1  # compiled afresh
    assert log.count("can't be read") == 1 and "changed since it was sealed" in log


def test_the_key_changes_with_torch_comfyui_plugin_and_gpu(tmp_path, monkeypatch):
    base = compile_cache.components("NVIDIA H200")
    root = str(tmp_path)
    seen = {compile_cache.folder(root, base)}
    assert compile_cache.folder(root, compile_cache.components("NVIDIA H200")) in seen  # stable
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    seen.add(compile_cache.folder(root, compile_cache.components("NVIDIA H200")))
    monkeypatch.undo()
    monkeypatch.setattr(compile_cache, "_comfyui_version", lambda: "0.0.1")
    seen.add(compile_cache.folder(root, compile_cache.components("NVIDIA H200")))
    monkeypatch.undo()
    code = tmp_path / "runtime"
    shutil.copytree(compile_cache._RUNTIME, code)  # the whole package
    monkeypatch.setattr(compile_cache, "_RUNTIME", str(code))
    same_code = compile_cache.folder(root, compile_cache.components("NVIDIA H200"))
    with open(code / "driver" / "router.py", "a") as f:
        f.write("\n# changed\n")
    seen.add(compile_cache.folder(root, compile_cache.components("NVIDIA H200")))
    monkeypatch.undo()
    seen.add(compile_cache.folder(root, compile_cache.components("NVIDIA H100 80GB HBM3")))
    assert same_code in {compile_cache.folder(root, base)}  # a copy of the same code is the same key
    assert len(seen) == 5


@pytest.fixture(autouse=True)
def _restore_cache_env(monkeypatch):
    """use() points this process's inductor and Triton at the folder; later tests must not inherit it."""
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(var, "unset")
        monkeypatch.delenv(var)


def test_files_written_after_the_last_seal_are_not_trusted(tmp_path):
    folder = compile_cache.use(str(tmp_path), "cpu")
    os.makedirs(os.path.join(folder, "inductor"))
    for name in ("kept", "unsealed"):
        with open(os.path.join(folder, "inductor", name), "w") as f:
            f.write(name)
        if name == "kept":
            compile_cache.seal(folder)
    assert compile_cache.use(str(tmp_path), "cpu") == folder
    assert os.listdir(os.path.join(folder, "inductor")) == ["kept"]


def test_an_unreadable_stamp_empties_the_folder_with_one_log_line(tmp_path, caplog):
    parts = compile_cache.components("cpu")
    folder = compile_cache.folder(str(tmp_path), parts)
    os.makedirs(os.path.join(folder, "inductor"))
    with open(os.path.join(folder, "inductor", "old"), "w") as f:
        f.write("from before")
    with open(os.path.join(folder, "stamp.json"), "w") as f:
        f.write("{not json")
    with caplog.at_level(logging.WARNING, logger="comfy_xdit_patch.rank.compile_cache"):
        assert compile_cache.use(str(tmp_path), "cpu") == folder
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.join(folder, "inductor")
    lines = [r for r in caplog.records if "can't be read" in r.getMessage()]
    assert len(lines) == 1 and "compile afresh" in lines[0].getMessage()
    assert not os.path.exists(os.path.join(folder, "inductor", "old"))
    with open(os.path.join(folder, "stamp.json")) as f:
        assert json.load(f) == parts


# Two ranks of a group share the folder: each writes artefacts and seals after its calls, as on 2 GPUs.
SEALER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    from comfy_xdit_patch.rank import compile_cache
    folder = compile_cache.use(sys.argv[1], "cpu")
    os.makedirs(os.path.join(folder, "inductor"), exist_ok=True)
    for i in range(200):
        with open(os.path.join(folder, "inductor", f"{{sys.argv[2]}}-{{i}}"), "w") as f:
            f.write("x" * i)
        compile_cache.seal(folder)
    print(folder)
""")


def test_ranks_sealing_the_same_folder_at_once_never_fail_and_keep_every_sealed_file(tmp_path):
    """On 2 H200s the ranks' seals raced on one temporary file name, and a rank's call failed."""
    procs = [subprocess.Popen([sys.executable, "-c", SEALER.format(repo=REPO), str(tmp_path), f"rank{r}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    folder = outs[0][0].strip()
    with open(os.path.join(folder, "stamp.json")) as f:
        compile_cache._check(folder, json.load(f))  # as the next start does: nothing was left unsealed
    assert len(os.listdir(os.path.join(folder, "inductor"))) == 400
    assert not [n for n in os.listdir(folder) if n.endswith(".part")]
