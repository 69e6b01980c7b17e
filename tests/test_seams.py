"""The ComfyUI seams the plugin hooks into (comfy_xdit_patch/driver/seams.py): where this ComfyUI has them all the
start-up hook attaches; where one is missing (an older ComfyUI) it attaches nothing and logs one line
naming it. Run against older ComfyUIs by `python -m comfy_xdit_patch.tools.versions` (docs/versions.md)."""
import importlib.util
import logging
import os
import threading

import comfy.model_management
import pytest

from comfy_xdit_patch.driver import patch, seams
from comfy_xdit_patch.driver import prestart as early
from comfy_xdit_patch.group import cluster
from conftest import assert_originals


@pytest.fixture
def start_up(monkeypatch, caplog):
    """start_up() -> (what the custom-node hook returned, its log records): the plugin on, 2 CPU ranks, no
    prestart, any session plugin detached meanwhile."""
    for k in list(os.environ):
        if k.startswith("COMFY_XDIT"):
            monkeypatch.delenv(k)
    for k, v in {"COMFY_XDIT": "1", "COMFY_XDIT_WORKERS": "2", "COMFY_XDIT_PRESTART": "0"}.items():
        monkeypatch.setenv(k, v)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hooks", "custom_node.py")
    spec = importlib.util.spec_from_file_location("xdit_hook_seams", path)
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    kept = patch.uninstall(close_group=False)

    def run():
        import comfy_xdit_patch

        monkeypatch.setattr(comfy_xdit_patch, "loaded_from", None, raising=False)  # each run: a new ComfyUI start
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="comfy_xdit_patch"):
            result = hook.on_load()
        return result, [r for r in caplog.records if r.name.startswith("comfy_xdit_patch")]

    yield run
    patch.uninstall()  # one this test attached (it started no group)
    if kept is not None:
        patch.install(kept.config, router=kept)


def _stepped_aside(result, records, lacking):
    assert result is None and not patch.installed()
    assert_originals()
    assert len(records) == 1, [r.getMessage() for r in records]  # one line, naming every missing seam
    assert records[0].levelno == logging.WARNING and all(s in records[0].getMessage() for s in lacking)


def test_this_comfyui_is_routed_or_left_as_shipped(start_up):
    lacking = seams.missing()
    result, records = start_up()
    if lacking:
        _stepped_aside(result, records, lacking)
    else:
        assert result is not None and patch.installed()
        assert not [r for r in records if r.levelno >= logging.WARNING]


def test_a_missing_seam_is_named_and_nothing_is_attached(start_up, monkeypatch):
    with monkeypatch.context() as m:  # put back before start_up's teardown reattaches a session plugin
        m.delattr(comfy.model_management, "unload_model_and_clones", raising=False)
        lacking = seams.missing()
        assert "comfy.model_management.unload_model_and_clones" in lacking
        with pytest.raises(seams.Missing, match=seams.OLDEST):
            patch.install(None)
        _stepped_aside(*start_up(), lacking)


def test_a_group_started_early_is_stopped(start_up, monkeypatch):
    """prestartup_script.py may have begun a group before the seams could be checked: it is cancelled."""
    calls, stopped = [], threading.Event()

    class Started:
        cancel = lambda self: calls.append("cancel")  # noqa: E731
        wait = lambda self: calls.append("wait")  # noqa: E731

        def shutdown(self):
            calls.append("shutdown")
            stopped.set()

    monkeypatch.setattr(early, "take", lambda config: Started())
    monkeypatch.setattr(cluster, "started_here", lambda: False)  # the session's own Ray is left alone
    with monkeypatch.context() as m:
        m.delattr(comfy.model_management, "unload_model_and_clones", raising=False)
        start_up()
    assert stopped.wait(10) and calls == ["cancel", "wait", "shutdown"]
