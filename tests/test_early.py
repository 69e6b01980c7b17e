"""The group started at ComfyUI's prestartup (driver/prestart.py): adopted when the settings match (shown through a
real server in test_server.py), cancelled and shut down when they don't."""
import os
import time

from comfy_xdit_patch import config as cfgmod
from comfy_xdit_patch.driver import last_run, prestart
from comfy_xdit_patch.group import lifecycle
from comfy_xdit_patch.errors import Cancelled


def test_a_group_started_early_with_other_settings_is_cancelled_and_shut_down(monkeypatch, router):
    router.close_group()  # this machine has 2 cores: the early group's ranks get them
    monkeypatch.setattr(prestart, "_early", None)
    monkeypatch.setattr(last_run, "_recorder", None)
    for k, v in {"COMFY_XDIT": "1", "COMFY_XDIT_WORKERS": "2", "COMFY_XDIT_PRESTART": "1",
                 "COMFY_XDIT_START_TIMEOUT": "120"}.items():
        monkeypatch.setenv(k, v)
    assert prestart.start()
    early = prestart._early
    # the hooks read other settings than prestartup did (here: another call timeout)
    other = cfgmod.load(dict(os.environ, COMFY_XDIT_TIMEOUT="99"), gpus=0)
    assert other != early.config
    time.sleep(3)  # let it get going: Ray, then the group
    assert prestart.take(other) is None and prestart.take(early.config) is None  # once only
    early.thread.join(150)
    assert not early.thread.is_alive()
    assert isinstance(early.error, Cancelled), early.error
    group = early.group
    if group is not None:
        deadline = time.monotonic() + 30
        while any(not lifecycle.process_gone(p) for p in group.pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(lifecycle.process_gone(p) for p in group.pids), "the cancelled group's ranks are gone"
        assert group.pg is None  # its placement was removed


def test_the_last_model_record_is_read_only_once_comfyui_imported_what_it_names(tmp_path, monkeypatch, caplog):
    """The early thread never imports a module itself (ComfyUI may be importing it on its main thread): a
    record naming one not imported yet is read once it is; at the first run's wait, it is given up."""
    import pickle
    import sys
    import threading
    import time
    import types

    from comfy_xdit_patch.config import load
    from comfy_xdit_patch.wire.spec import NO_PATCHES, ModelSpec

    config = load({"COMFY_XDIT_CACHE_DIR": str(tmp_path)})
    mod = types.ModuleType("xdit_loader_pack")
    exec("def loader(path):\n    return path\n", mod.__dict__)
    monkeypatch.setitem(sys.modules, "xdit_loader_pack", mod)
    spec = ModelSpec("base", "key", (mod.loader, ("flux.safetensors",)), {}, NO_PATCHES, {}, False)
    with open(tmp_path / last_run.LAST, "wb") as f:
        pickle.dump(last_run.Record(spec), f)
    monkeypatch.delitem(sys.modules, "xdit_loader_pack")
    wanted, cancelled, out = threading.Event(), threading.Event(), []
    reader = threading.Thread(target=lambda: out.append(last_run.read(config, wanted, cancelled,
                                                                         time.monotonic() + 60)))
    reader.start()
    time.sleep(0.5)
    assert reader.is_alive() and "xdit_loader_pack" not in sys.modules  # waiting, not importing
    monkeypatch.setitem(sys.modules, "xdit_loader_pack", mod)  # ComfyUI loaded the node pack
    reader.join(5)
    assert out == [last_run.Record(spec)]
    monkeypatch.delitem(sys.modules, "xdit_loader_pack")
    wanted.set()  # the first run wants the group: one last try
    with caplog.at_level("INFO", logger="comfy_xdit_patch"):
        assert last_run.read(config, wanted, cancelled, time.monotonic() + 60) is None
    assert "xdit_loader_pack.loader is not imported" in caplog.text


def test_the_record_is_for_the_user_alone_and_off_with_remember_0(tmp_path, monkeypatch):
    """The record holds the prompt's embeddings: written 0600 in a 0700 folder; COMFY_XDIT_REMEMBER=0 keeps none."""
    from comfy_xdit_patch.wire.spec import NO_PATCHES, ModelSpec

    monkeypatch.setattr(prestart.EarlyStart, "run", lambda self: None)  # the settings' effect only, no group
    spec = ModelSpec("base", "key", (os.path.join, ("flux.safetensors",)), {}, NO_PATCHES, {}, False)
    cache = tmp_path / "cache"
    for remember, kept in (("0", False), ("1", True)):
        monkeypatch.setattr(prestart, "_early", None)
        monkeypatch.setattr(last_run, "_recorder", None)
        for k, v in {"COMFY_XDIT": "1", "COMFY_XDIT_PRESTART": "1", "COMFY_XDIT_CACHE_DIR": str(cache),
                     "COMFY_XDIT_REMEMBER": remember}.items():
            monkeypatch.setenv(k, v)
        assert prestart.start()
        prestart._early.thread.join(5)
        last_run.remember(spec)
        assert (cache / last_run.LAST).exists() == kept
    assert os.stat(cache / last_run.LAST).st_mode & 0o777 == 0o600 and os.stat(cache).st_mode & 0o777 == 0o700
