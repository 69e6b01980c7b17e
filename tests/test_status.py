"""GET /xdit/status and the panel, through a real ComfyUI server (main.py --cpu) with 2 CPU ranks:
before and after a routed prompt (counters as the log says), in a real browser, after a rank is
killed mid-run (fallback), and with the plugin off. One server serves the module (start-up is slow)."""
import asyncio
import json
import os
import re
import shutil
import signal
import threading
import time
import urllib.request
import uuid

import aiohttp
import pytest

from comfy_xdit_patch.tools import headless, synthetic
from conftest import COMFYUI, REPO

LINE = re.compile(r"(\d+) of (\d+) model calls ran on the 2-rank worker group")


def workflow(steps=4, seed=5):
    return headless.flux_workflow(96, 80, steps=steps, seed=seed, unet="tiny_flux.safetensors",
                                  vae="tiny_taesd16.safetensors", context_dim=synthetic.TINY_CONTEXT_DIM)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, router):
    router.close_group()  # this machine has 2 cores: the server's ranks get them to themselves
    base = headless.prepare_base(str(tmp_path_factory.mktemp("comfy_base")), REPO)
    synthetic.save(synthetic.tiny_flux(seed=0), os.path.join(base, "models/diffusion_models/tiny_flux.safetensors"))
    synthetic.save(synthetic.taesd_vae(16, seed=0), os.path.join(base, "models/vae/tiny_taesd16.safetensors"))
    return base


@pytest.fixture(scope="module")
def server(base_dir):
    with headless.Server(COMFYUI, base_dir, env={"COMFY_XDIT": "1", "COMFY_XDIT_WORKERS": "2"}, cpu=True,
                         log_path=os.path.join(base_dir, "status-on.log")) as s:
        yield s


def status(server, ranks=True) -> dict:
    with urllib.request.urlopen(f"{server.url}/xdit/status{'' if ranks else '?ranks=0'}", timeout=60) as r:
        return json.loads(r.read())


def wait_for(server, test, timeout=300, ranks=True) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = status(server, ranks)
        if test(doc):
            return doc
        assert time.monotonic() < deadline, f"status never got there: {json.dumps(doc)[:2000]}"
        time.sleep(0.2)


class Listener(threading.Thread):
    """A websocket client of the server, as the browser is: keeps every message it gets."""

    def __init__(self, url: str):
        super().__init__(daemon=True)  # ends when the server closes the socket
        self.client_id = uuid.uuid4().hex
        self.url = url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self.messages: list = []
        self.ready = threading.Event()

    def run(self):
        asyncio.run(self._listen())

    async def _listen(self):
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            self.ready.set()
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.messages.append(json.loads(msg.data))

    def of(self, kind: str) -> list:
        return [m["data"] for m in list(self.messages) if m["type"] == kind]


def last_line(server) -> tuple[int, int]:
    routed, total = LINE.findall(server.log())[-1]
    return int(routed), int(total)


def test_before_a_prompt(server):
    s = wait_for(server, lambda d: d["state"] == "ready")  # prestart brings the group up at launch
    assert s["enabled"] and s["reason"] is None
    assert s["settings"]["workers"] == 2 and s["settings"]["gpus"] == 0 and s["device"] == "CPU"
    assert s["versions"]["comfyui"] and s["versions"]["torch"] and s["versions"]["ray"]
    assert [r["rank"] for r in s["ranks"]] == [0, 1]
    pids = [r["pid"] for r in s["ranks"]]
    assert len(set(pids)) == 2 and server.proc.pid not in pids
    for r in s["ranks"]:
        assert r["device"] == "cpu" and r["calls"] == 0 and r["memory"] > 0 and r["memory_peak"] >= r["memory"]
    assert s["last_run"] is None and s["fallbacks"] == 0 and s["group_starts"] == 1


def test_after_a_routed_prompt(server):
    before = status(server)
    listener = Listener(server.url)
    listener.start()
    assert listener.ready.wait(60)
    server.run(workflow(), timeout=600, client_id=listener.client_id)
    s = status(server)
    routed, total = last_line(server)
    assert (routed, total) == (4, 4)
    run = s["last_run"]
    assert (run["routed"], run["routed"] + run["local"]) == (routed, total)
    assert s["routed_calls"] - before["routed_calls"] == routed
    # every rank computed every routed call
    assert [a["calls"] - b["calls"] for a, b in zip(s["ranks"], before["ranks"])] == [routed, routed]
    assert run["layout"] == "cfg=1,ulysses=2,ring=1" and run["size"] == "96x80" and run["steps"] == 4
    assert run["s_per_step"] > 0 and all(r["last_call"] for r in s["ranks"])
    assert s["state"] == "ready" and s["run"] is None
    # pushed as it happened: the model loading on the ranks, then the end of the run with its counts
    deadline = time.monotonic() + 30
    while not any((e["last_run"] or {}).get("routed") == routed for e in listener.of("xdit.status")):
        assert time.monotonic() < deadline, listener.of("xdit.status")
        time.sleep(0.1)
    events = listener.of("xdit.status")
    assert [e["detail"] for e in events if e["state"] == "loading"] == ["loading FLUX on 2 ranks"]
    assert events[-1]["state"] == "ready" and events[-1]["last_run"]["routed"] == routed
    # the sampler node's progress bar: a stage of the group's (loading: 1 of 3) before the steps
    bars = [(p["value"], p["max"]) for p in listener.of("progress")]
    assert (1, 3) in bars and bars.index((1, 3)) < bars.index((4, 4)), bars


@pytest.mark.slow
def test_panel_in_a_browser(server, tmp_path):
    """Headless Chromium (Debian's package) opens ComfyUI's page; the sidebar tab shows the group."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("no chromium/chromedriver: apt-get install -y chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in requirements-test.txt")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wf = workflow(seed=11)
    server.run(wf, timeout=600)
    routed, _ = last_line(server)
    # a first visit opens the template browser over everything; this user has seen it
    urllib.request.urlopen(urllib.request.Request(f"{server.url}/settings/Comfy.TutorialCompleted", data=b"true",
                                                  method="POST"), timeout=30)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    # NOTE: an explicit driver path: Selenium then downloads nothing
    browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        browser.get(server.url)
        wait = WebDriverWait(browser, 180, poll_frequency=0.5)
        button = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, 'button[aria-label="xDiT worker group"]'))
        browser.execute_script("arguments[0].click()", button[0])  # past any dialog in the way
        shown = wait.until(lambda b: _panel(b, By))
        assert shown["state"] == "ready" and shown["ranks"] == ["ready", "ready"], shown
        assert shown["routed"] == str(routed) == "4", shown
        # live: a run queued now reaches the open panel through the xdit.status event, no reload
        server.run(workflow(steps=3, seed=12), timeout=600)
        assert last_line(server) == (3, 3)
        wait.until(lambda b: (_panel(b, By) or {}).get("routed") == "3")
        # the graph that ran, for the screenshot's sake (the panel does not depend on it)
        browser.execute_script("window.comfyAPI?.app?.app?.loadApiJson?.(arguments[0], 'flux')", wf)
        time.sleep(1)
        browser.save_screenshot(str(tmp_path / "status-panel.png"))
    finally:
        browser.quit()
    assert os.path.getsize(tmp_path / "status-panel.png") > 10_000


def _panel(browser, By):
    """What the panel shows, once it shows both ranks and a run; else None (keep waiting)."""
    states = browser.find_elements(By.CSS_SELECTOR, '[data-xdit="state"]')
    ranks = browser.find_elements(By.CSS_SELECTOR, '[data-xdit-rank] [data-xdit="rank-state"]')
    routed = browser.find_elements(By.CSS_SELECTOR, '[data-xdit="routed"]')
    if not (states and len(ranks) == 2 and routed):
        return None
    return {"state": states[0].text, "ranks": [r.text for r in ranks], "routed": routed[0].text}


@pytest.mark.slow
def test_after_a_rank_dies_mid_run(server):
    """Rank 1 killed by the pid the status gives, while a run is routed: the run finishes in ComfyUI's
    process; the status says what failed, and the next run starts a fresh group."""
    before = status(server)
    if not before["ranks"]:  # an earlier test left no group (the browser's, when it skips, brings none up)
        server.run(workflow(seed=6), timeout=600)
        before = status(server)
    done = {}
    runner = threading.Thread(target=lambda: done.update(result=server.run(workflow(steps=40, seed=7), timeout=600)))
    runner.start()
    try:
        wait_for(server, lambda d: (d["run"] or {}).get("routed", 0) >= 2, timeout=600, ranks=False)
        os.kill(before["ranks"][1]["pid"], signal.SIGKILL)
    finally:
        runner.join(600)
    assert len(done["result"]["images"]) == 1
    s = status(server)
    routed, total = last_line(server)
    run = s["last_run"]
    assert (run["routed"], run["routed"] + run["local"]) == (routed, total) and total == 40
    assert routed >= 2 and run["local"] >= 1
    assert s["fallbacks"] == before["fallbacks"] + 1 and s["restarts"] == 1
    assert s["last_fallback"]["where"] == "a routed model call"
    # the killed rank is the reason, not a survivor's broken collective that surfaced first
    assert s["last_fallback"]["error"].startswith("WorkerDied") and "rank 1" in s["last_fallback"]["error"], \
        s["last_fallback"]
    assert s["state"] == "idle" and s["enabled"] and s["ranks"] == []  # torn down, not unpatched
    server.run(workflow(seed=8), timeout=600)
    s = status(server)
    assert s["state"] == "ready" and s["group_starts"] == before["group_starts"] + 1
    assert s["last_run"]["routed"] == 4 and before["ranks"][1]["pid"] not in [r["pid"] for r in s["ranks"]]


def test_plugin_off_says_why(base_dir):
    with headless.Server(COMFYUI, base_dir, env={"COMFY_XDIT": "0"}, cpu=True,
                         log_path=os.path.join(base_dir, "status-off.log")) as off:
        s = status(off)
    assert s["enabled"] is False and s["state"] == "off" and s["reason"] == "COMFY_XDIT=0"
    assert s["ranks"] == [] and s["settings"]["enabled"] is False


def test_broken_says_why_in_process(config):
    """The router's own transitions, no server: what a failure that unpatches leaves in the document."""
    from comfy_xdit_patch.driver import status
    from comfy_xdit_patch.driver.router import Router

    router = Router(config)
    status.reset()
    status.attach(router)
    pushed = []
    status._plugin.push = pushed.append
    try:
        s = status.snapshot(ask_ranks=True)  # no group: nothing to ask
        assert s["state"] == "idle" and s["enabled"] and s["ranks"] == [] and json.dumps(s)
        router.disable("GroupBroken: Ray could not place 2 ranks")
        s = status.snapshot()
        assert s["state"] == "broken" and s["enabled"] is False
        assert s["reason"] == s["detail"] == "GroupBroken: Ray could not place 2 ranks"
        assert pushed and pushed[-1]["state"] == "broken"
    finally:
        status.reset()


def test_size_shows_pixels_by_the_models_latent_format(tiny_flux, tmp_path):
    """The run's size (the document's last_run, the panel) in pixels: 8 a latent cell for FLUX.1 and Wan 2.1,
    16 for Wan 2.2 TI2V-5B, from ComfyUI's latent format; a video's frames from its temporal ratio."""
    import comfy.sd

    from comfy_xdit_patch.driver.router import pixel_size
    from comfy_xdit_patch.tools import synthetic_wan

    def load(path):
        return comfy.sd.load_diffusion_model(path)

    assert pixel_size(load(tiny_flux), (1, 16, 10, 12)) == "96x80"
    for layout, shape, size in (("2.1-t2v", (1, 16, 5, 6, 10), "80x48, 17 frames"),
                                ("2.2-ti2v-5b", (1, 48, 4, 6, 7), "112x96, 13 frames")):
        path = synthetic.save(synthetic_wan.tiny_wan(layout, layers=1), str(tmp_path / f"{layout}.safetensors"))
        assert pixel_size(load(path), shape) == size, layout
