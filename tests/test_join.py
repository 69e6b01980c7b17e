"""group/join.py's probe and join against real processes on loopback (127.0.0.2-.6 only: Ray rewrites 127.0.0.1 and
localhost to the machine's external IP). Every Ray head here is started by the test with its own --temp-dir and
ports, and stopped by its own process tree (never `ray stop`, which stops every Ray on the machine). Drivers run
as subprocesses: Ray's token and auth mode are cached per process (C++), and a joined process stays joined.

    RAY_OLD=path/to/another/ray's/bin/ray: also a head of another Ray version (skipped without)
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
RAY_OLD = os.environ.get("RAY_OLD", "")
TOKEN, OTHER = "a" * 64, "b" * 64
MARGIN = 2.0  # seconds past a call's timeout it may take (import of ray in the driver is timed apart)


def free_port(host: str = "") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def driver(code: str, timeout: float, auth: str | None = "token", token: str | None = TOKEN, **extra) -> list:
    """Run `code` in a fresh Python (raysafe and ray imported, `out(**kw)` prints a JSON line); its lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    home = tempfile.mkdtemp(prefix="rs_home_")  # no ~/.ray/auth_token of the user's
    env.update(PYTHONPATH=REPO, HOME=home)
    env.update({"RAY_AUTH_MODE": auth} if auth else {})
    env.update({"RAY_AUTH_TOKEN": token} if token else {}, **extra)
    prog = ("import json, sys, time, ray\nfrom comfy_xdit_patch.group import join as raysafe\n"
            "def out(**kw): print(json.dumps(kw), flush=True)\n"
            "def timed(f, *a, **k):\n    t = time.monotonic(); r = f(*a, **k); return r, time.monotonic() - t\n" + code)
    p = subprocess.Popen([sys.executable, "-c", prog], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the driver's own session: only what this test started
        stdout, stderr = p.communicate()
        raise AssertionError(f"driver ran past {timeout}s:\n{stdout}\n{stderr[-3000:]}")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert p.returncode == 0, f"driver exit {p.returncode}:\n{stdout}\n{stderr[-3000:]}"
    got = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    print(*got, sep="\n")
    return got


class Head:
    """`ray start --head --block` on `host`, token auth on; stopped by its process tree (taken before any kill:
    orphans are re-parented)."""

    def __init__(self, host: str, port: int, ray: str = RAY, token: str = TOKEN, cpus: int = 1):
        self.temp = tempfile.mkdtemp(prefix="rs_", dir="/tmp")  # short: Ray's socket paths have a length limit
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        ports = [a for n in ("dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                             "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
                             "object-manager-port") for a in (f"--{n}", str(free_port()))]
        self.log = os.path.join(self.temp, "head.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [ray, "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address", host, "--port",
                 str(port), "--include-dashboard", "false", "--num-cpus", str(cpus), "--temp-dir", self.temp, *ports],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.address, self.seen = f"{host}:{port}", {}
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in open(self.log).read():
            assert self.proc.poll() is None and time.monotonic() < deadline, open(self.log).read()[-3000:]
            time.sleep(0.3)
        self.members()

    def members(self) -> list:
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                self.seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
        return [p for p in self.seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def raylet(self) -> psutil.Process:
        return next(p for p in self.members() if p.name() == "raylet")

    def stop(self) -> None:
        self.members()
        for sig in (signal.SIGCONT, signal.SIGTERM, signal.SIGKILL):
            for p in self.members():
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            if sig != signal.SIGCONT:
                psutil.wait_procs(self.members(), timeout=10)
            if not self.members():
                break
        self.proc.wait(10)
        left = self.members()
        if not left:
            shutil.rmtree(self.temp, ignore_errors=True)
        assert not left, f"head processes left: {left}"


@pytest.fixture(scope="module")
def head():
    h = Head("127.0.0.4", free_port())
    yield h
    h.stop()


class Listener:
    """A TCP server thread (on 127.0.0.3 unless said) that accepts and then sends `reply` (None: never a word)."""

    def __init__(self, reply: bytes | None = None, host: str = "127.0.0.3", port: int = 0):
        self.sock = socket.create_server((host, port))
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.held, self.reply = [], reply
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(c)
            if self.reply is not None:
                c.sendall(self.reply)

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


def _probe_here(address: str, timeout: float):
    from comfy_xdit_patch.group import join as raysafe

    t = time.monotonic()
    cause = raysafe.probe(address, timeout)
    print({"cause": cause, "took": time.monotonic() - t})
    return cause, time.monotonic() - t


@pytest.mark.timeout(30)
def test_nothing_listens():
    import ray  # noqa: F401  (timed apart from the probe)

    address = f"127.0.0.2:{free_port('127.0.0.2')}"
    cause, took = _probe_here(address, 5)
    assert cause.startswith(f"nothing listens at {address} (connection refused)") and took < 5 + MARGIN


@pytest.mark.timeout(30)
@pytest.mark.parametrize("reply, expect", [(None, "is not answering as a Ray GCS (no gRPC reply in 3s)"),
                                           (b"HTTP/1.1 400 Bad Request\r\n\r\n", "does not speak gRPC")])
def test_listener_that_is_not_a_gcs(reply, expect):
    import ray  # noqa: F401

    server = Listener(reply)
    try:
        cause, took = _probe_here(server.address, 3)
    finally:
        server.close()
    assert expect in cause and took < 3 + MARGIN


@pytest.mark.slow  # a Ray head of its own
@pytest.mark.timeout(120)
@pytest.mark.parametrize("auth, token, expect", [("token", OTHER, "refused this process's token"),
                                                 (None, None, "requires token authentication"),
                                                 ("token", None, "RAY_AUTH_MODE=token but this process has no")])
def test_head_refuses_token(head, auth, token, expect):
    got = driver(f"c, took = timed(raysafe.probe, {head.address!r}, 5); out(cause=c, took=took)\n"
                 f"c, took = timed(raysafe.join, {head.address!r}, 5); out(cause=c, took=took)\n"
                 "out(init=ray.is_initialized())", 60, auth=auth, token=token)
    for step in got[:2]:
        assert expect in step["cause"] and step["took"] < 5 + MARGIN, got
    assert got[2] == {"init": False}


@pytest.mark.slow  # a Ray head of its own
@pytest.mark.timeout(120)
def test_token_file_fixed_between_joins(head, tmp_path):
    """Ray caches a process's token: join reloads it, so a token file fixed after a refusal counts next time."""
    path = tmp_path / "token"
    path.write_text(OTHER)
    got = driver(f"c, took = timed(raysafe.join, {head.address!r}, 5); out(cause=c, took=took)\n"
                 f"open({str(path)!r}, 'w').write({TOKEN!r})\n"
                 f"c, took = timed(raysafe.join, {head.address!r}, 20); out(cause=c, took=took)", 60,
                 token=None, RAY_AUTH_TOKEN_PATH=str(path))
    assert "refused this process's token" in got[0]["cause"] and got[0]["took"] < 5 + MARGIN
    assert got[1]["cause"] is None and got[1]["took"] < 20 + MARGIN


@pytest.mark.slow  # a Ray head of its own
@pytest.mark.timeout(120)
def test_version_mismatch_simulated(head):
    """This driver claims another Ray version: the probe says so; join's ray.init (probe skipped) fails on Ray's
    own check, leaves nothing that blocks the next join, which connects."""
    got = driver("real = ray.__version__; ray.__version__ = '2.0.0'\n"
                 f"c, took = timed(raysafe.probe, {head.address!r}, 5); out(cause=c, took=took)\n"
                 "probe = raysafe.probe; raysafe.probe = lambda a, t: None\n"
                 f"c, took = timed(raysafe.join, {head.address!r}, 10); out(cause=c, took=took)\n"
                 "ray.__version__ = real; raysafe.probe = probe\n"
                 f"c, took = timed(raysafe.join, {head.address!r}, 30)\n"
                 "out(cause=c, took=took, nodes=len(ray.nodes()))", 90)
    assert "runs Ray " + ray_version() + " on Python" in got[0]["cause"] and "has Ray 2.0.0" in got[0]["cause"]
    assert "failed: RuntimeError: Version mismatch" in got[1]["cause"] and got[1]["took"] < 10 + MARGIN
    assert got[2]["cause"] is None and got[2]["nodes"] == 1 and got[2]["took"] < 30 + MARGIN


def ray_version() -> str:
    import ray

    return ray.__version__


@pytest.mark.slow  # a Ray head of its own
@pytest.mark.timeout(150)
@pytest.mark.skipif(not RAY_OLD or not os.path.exists(RAY_OLD), reason="no other Ray version installed (RAY_OLD)")
def test_head_of_another_ray_version():
    old = Head("127.0.0.5", free_port(), ray=RAY_OLD)
    try:
        got = driver(f"c, took = timed(raysafe.join, {old.address!r}, 5); out(cause=c, took=took)", 60)
    finally:
        old.stop()
    assert "runs Ray " in got[0]["cause"] and f"this ComfyUI has Ray {ray_version()}" in got[0]["cause"]
    assert got[0]["took"] < 5 + MARGIN


@pytest.mark.slow  # a Ray head of its own
@pytest.mark.timeout(120)
def test_no_node_here_and_hung_raylet(head):
    # no raylet of this cluster among this machine's (Ray reads them from `ps`): as if ComfyUI ran elsewhere
    got = driver("import ray._private.services as s; s.find_node_ids = lambda: []\n"
                 f"c, took = timed(raysafe.probe, {head.address!r}, 5); out(cause=c, took=took)", 60)
    assert "no node of the Ray cluster at" in got[0]["cause"] and got[0]["took"] < 5 + MARGIN
    raylet = head.raylet()
    raylet.suspend()  # this test's own head: a raylet that does not answer (ray.init would end the driver)
    try:
        got = driver(f"c, took = timed(raysafe.join, {head.address!r}, 4); out(cause=c, took=took, "
                     "init=ray.is_initialized())", 60)
    finally:
        raylet.resume()
    assert "the Ray node on this machine is not usable" in got[0]["cause"] and got[0]["took"] < 4 + MARGIN
    assert got[0]["init"] is False


@pytest.mark.slow  # a Ray head of its own
@pytest.mark.timeout(240)
def test_join_fails_then_succeeds_once_head_is_up():
    """One driver process: joins fail while nothing listens, the head comes up, a later join connects."""
    port = free_port()
    address = f"127.0.0.6:{port}"
    code = (f"t0 = time.monotonic()\n"
            f"while time.monotonic() - t0 < 180:\n"
            f"    c, took = timed(raysafe.join, {address!r}, 5); out(cause=c, took=took)\n"
            f"    if c is None: break\n"
            f"    time.sleep(1)\n"
            f"out(nodes=len(ray.nodes()), again=raysafe.join({address!r}, 5))")
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(got=driver(code, 200)), daemon=True)
    t.start()
    time.sleep(4)  # the driver's first joins fail
    h = Head("127.0.0.6", port)
    try:
        t.join(200)
    finally:
        h.stop()
    got = result["got"]
    # while the head starts: nothing listens, then no node yet; a ray.init that outlives a join is taken by the next
    steps, last = got[:-1], got[-1]
    assert "nothing listens" in steps[0]["cause"] and steps[-1]["cause"] is None, got
    assert all(g["took"] < 5 + MARGIN for g in steps) and last == {"nodes": 1, "again": None}, got


@pytest.mark.slow  # a Ray head of its own
@pytest.mark.timeout(180)
def test_hung_init_is_left_behind_then_taken(head):
    """ray.init itself hangs (a silent listener, probe skipped): join returns at its deadline; the next join
    waits for that ray.init instead of starting a second; once Ray gives up on it, a join connects.
    Ray's own retries are cut to 1 (~41 s) so that the left-behind ray.init ends within the test."""
    server = Listener(None)
    try:
        got = driver("import ray._private.ray_constants as rc; rc.NUM_REDIS_GET_RETRIES = 1\n"
                     "probe = raysafe.probe; raysafe.probe = lambda a, t: None\n"
                     f"c, took = timed(raysafe.join, {server.address!r}, 3); out(cause=c, took=took)\n"
                     "raysafe.probe = probe\n"
                     f"c, took = timed(raysafe.join, {head.address!r}, 3); out(cause=c, took=took)\n"
                     f"c, took = timed(raysafe.join, {head.address!r}, 90); out(cause=c, took=took, "
                     "nodes=len(ray.nodes()))", 150)
    finally:
        server.close()
    assert "did not finish within 3s" in got[0]["cause"] and got[0]["took"] < 3 + MARGIN
    assert "an earlier ray.init" in got[1]["cause"] and got[1]["took"] < 3 + MARGIN
    assert got[2]["cause"] is None and got[2]["nodes"] == 1 and got[2]["took"] < 90 + MARGIN
