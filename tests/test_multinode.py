"""Beyond one host: a real two-node Ray cluster on this machine (head on 127.0.0.1, a second node on
127.0.0.2, one CPU each, token authentication on), the plugin joined to it by COMFY_XDIT_RAY_ADDRESS.

The slow test runs ComfyUI's side as its own process (tests/multinode_driver.py), so that Ray in it is
the joined cluster's, not the session's private one. The other tests check the pieces (rank order by
node, the mesh across nodes, the model-file check) without a cluster.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import tiny
from comfy_xdit_patch.group import ray_nodes as nodes
from comfy_xdit_patch.wire import mesh as layout
from comfy_xdit_patch.tools.headless import free_port
from conftest import REPO, TOL, sample

RAY = shutil.which("ray") or shutil.which("ray", path=os.path.dirname(sys.executable))


# --- the pieces ------------------------------------------------------------------------------------
def test_ranks_are_numbered_by_node_driver_node_first():
    # bundles as Ray may place them with PACK over two nodes: interleaved
    assert nodes.rank_order(["b", "a", "b", "a"], first="a") == [1, 3, 0, 2]
    assert nodes.rank_order(["b", "a", "b", "a"], first="z") == [0, 2, 1, 3]
    node_of = tuple(["b", "a", "b", "a"][i] for i in nodes.rank_order(["b", "a", "b", "a"], first="a"))
    assert node_of == ("a", "a", "b", "b")


def test_room_counts_alive_nodes_and_whole_bundles():
    ns = [{"Alive": True, "Resources": {"CPU": 3.0, "GPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 8.0}},
          {"Alive": True, "Resources": {"CPU": 1.0}}]
    assert nodes.room(ns, {"CPU": 1}) == 4
    assert nodes.room(ns, {"CPU": 1, "GPU": 1}) == 2


def test_mesh_keeps_sequence_groups_on_one_node():
    two_by_two = ("a", "a", "b", "b")
    # cfg 3.5 (batch 2) on 2 nodes x 2 ranks: one CFG branch per node, its Ulysses pair inside the node
    mesh = layout.choose_mesh(4, 2, 24, None, False, node_of=two_by_two)
    assert mesh == layout.Mesh(2, 2, 1) and layout.spanning(mesh, two_by_two) == 0
    # cfg 1 (batch 1): the one group must span the nodes; with the ring, Ulysses stays inside a node
    mesh = layout.choose_mesh(4, 1, 24, None, True, node_of=two_by_two)
    assert mesh == layout.Mesh(1, 2, 2) and layout.spanning(mesh, two_by_two, "ulysses") == 0
    assert layout.choose_mesh(4, 1, 24, None, True) == layout.Mesh(1, 4, 1)  # one node: Ulysses only
    assert layout.choose_mesh(4, 1, 24, None, False, node_of=two_by_two) == layout.Mesh(1, 4, 1)  # no ring: crosses
    assert layout.spanning(layout.Mesh(1, 4, 1), two_by_two) == 1
    # ranks interleaved over nodes (as they would be without rank_order) would put each pair across nodes
    assert layout.spanning(layout.Mesh(2, 2, 1), ("a", "b", "a", "b")) == 2


def test_missing_model_file_names_node_and_path(tmp_path):
    from comfy_xdit_patch.rank.models import missing_files
    from comfy_xdit_patch.wire.spec import ModelSpec

    here, gone = tmp_path / "here.safetensors", str(tmp_path / "gone.safetensors")
    here.write_bytes(b"x")
    stamps = ((str(here), 1, 0), (gone, 1, 0))  # (path, size, mtime_ns) as ComfyUI's process saw them
    spec = ModelSpec("b", "k", (print, (str(here), gone)), None, None, {}, False, files=stamps)
    assert missing_files(spec) == [gone]
    msg = nodes.absent_message({1: ("127.0.0.2", [gone]), 0: ("10.0.0.1", [gone])})
    assert f"{gone} is missing on node 127.0.0.2 (rank 1)" in msg and "on node 10.0.0.1 (rank 0)" in msg


def test_missing_model_file_runs_locally_and_plugin_stays_on(router, unrouted, tiny_flux, tmp_path, load_flux,
                                                             caplog):
    """A model whose file the ranks can't see runs in ComfyUI's process, with one line naming node and
    path; the plugin and its group stay, other models keep being routed, and the file back routes again."""
    path = str(shutil.copy(tiny_flux, tmp_path / "only_here.safetensors"))
    model, other = load_flux(path), load_flux(tiny_flux)
    pos, neg, latent = tiny.conditioning(1), tiny.conditioning(2), tiny.latent(64, 48)
    with unrouted():
        reference = sample(model, pos, neg, latent)
    sample(other, pos, neg, latent, steps=1)  # group up
    group = router.group
    kept = path + ".away"
    os.rename(path, kept)
    try:
        routed = router.stats["routed_calls"]
        with caplog.at_level("INFO", logger="comfy_xdit_patch"):
            out = sample(model, pos, neg, latent)
            sample(model, pos, neg, latent)  # again: said once
        assert (out - reference).abs().max().item() <= TOL
        said = [r.getMessage() for r in caplog.records if "is missing on node" in r.getMessage()]
        # one machine: both ranks' node (the private cluster's 127.0.0.1) lacks it
        assert len(said) == 1 and f"{path} is missing on node 127.0.0.1 (ranks 0,1)" in said[0], said
        assert router.active and router.group is group and router.stats["routed_calls"] == routed
        sample(other, pos, neg, latent, steps=1)
        assert router.stats["routed_calls"] == routed + 1  # other models: still routed
    finally:
        os.rename(kept, path)
    sample(model, pos, neg, latent, steps=1)
    assert router.stats["routed_calls"] == routed + 2 and router.group is group


# --- a real two-node cluster -----------------------------------------------------------------------
def tree(pid: int) -> list:
    """The process and all its descendants (psutil.Process objects), as they are now."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class Node:
    """One `ray start --block` and everything it starts. NOTE: Ray's worker processes make process groups
    of their own, so the node is stopped by its process tree (taken before anything is killed: orphans
    are re-parented), never by name or by `ray stop`, which would stop every Ray on the machine."""

    def __init__(self, args: list[str], env: dict, log: str):
        self.log = open(log, "w")
        self.proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        self.seen: dict = {}

    def members(self) -> list[int]:
        """This node's processes still running (all it has started, as far as this test saw them)."""
        for p in tree(self.pid):
            self.seen.setdefault(p.pid, p)
        return [pid for pid, p in self.seen.items() if p.is_running() and p.status() != "zombie"]

    def wait_listening(self, port: int, log: str, timeout: float = 120) -> None:
        """Until the head's GCS takes connections; fails at once if `ray start` exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, open(log).read()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"the head did not listen on {port} within {timeout:.0f}s")

    def stop(self) -> None:
        import psutil

        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            for pid in self.members():
                try:
                    self.seen[pid].send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            deadline = time.monotonic() + wait
            while self.members() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.members():
                break
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


def _ports(*names: str) -> list[str]:
    return [a for n in names for a in (f"--{n}", str(free_port()))]


@pytest.fixture
def cluster(tmp_path):
    if RAY is None:
        pytest.skip("the `ray` command is not installed")
    temp = tempfile.mkdtemp(prefix="rmn_", dir="/tmp")  # short: Ray's Unix socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # NOTE: token authentication stays on, as a cluster should run; the token is this test's own (not the
    # user's ~/.ray/auth_token). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the private cluster's setting) would
    # make the second node refuse to join, so no RAY_ variable of this process is passed on.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_TMPDIR=temp,
               RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    port = free_port()
    common = ["--num-cpus", "1", "--temp-dir", temp]
    started = []
    try:
        started.append(Node(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard",
                             "false", *common, *_ports("dashboard-port",
                                                       "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                       "metrics-export-port", "runtime-env-agent-port",
                                                       "node-manager-port", "object-manager-port")],
                            env, str(tmp_path / "head.log")))
        address = f"127.0.0.1:{port}"
        started[0].wait_listening(port, str(tmp_path / "head.log"))
        started.append(Node(["--address", address, "--node-ip-address", "127.0.0.2", *common,
                             *_ports("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                                     "runtime-env-agent-port", "node-manager-port", "object-manager-port")],
                            env, str(tmp_path / "node2.log")))
        # both nodes alive, seen from a throwaway driver (Ray stays out of this process)
        wait = ("import ray, time; ray.init(address=%r, log_to_driver=False)\n"
                "t = time.monotonic()\n"
                "while sum(n['Alive'] for n in ray.nodes()) < 2 and time.monotonic() - t < 90: time.sleep(0.5)\n"
                "print(sum(n['Alive'] for n in ray.nodes()))" % address)
        alive = subprocess.run([sys.executable, "-c", wait], env=env, capture_output=True, text=True, timeout=150)
        assert alive.stdout.strip().endswith("2"), (alive.stdout, alive.stderr[-2000:], open(tmp_path / "node2.log").read())
        yield {"address": address, "env": env, "head": started[0], "second": started[1]}
    finally:
        for node in reversed(started):
            node.stop()
        left = [p for node in started for p in node.members()]
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the test's Ray nodes still running: {left}"


def _drive(cluster, model: str, *extra: str, timeout: float = 900) -> dict:
    env = dict(cluster["env"], COMFY_XDIT="1", COMFY_XDIT_WORKERS="2", COMFY_XDIT_RAY_ADDRESS=cluster["address"],
               COMFY_XDIT_TIMEOUT="120", COMFY_XDIT_START_TIMEOUT="240", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "multinode_driver.py"), model,
                           str(cluster["second"].pid), *extra], env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert reports, f"no report from the driver:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(reports[-1])


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_node_cluster(cluster, tiny_flux):
    seen = _drive(cluster, tiny_flux)
    print(json.dumps(seen, indent=1))  # shown with -s, or on failure
    one, cfg = seen["cfg1.0"], seen["cfg3.5"]
    # the two ranks on different nodes: rank 0 beside the driver (the head), rank 1 on 127.0.0.2
    assert len(set(one["node_of"])) == 2 and one["ips"][1] == "127.0.0.2" and one["ips"][0] != "127.0.0.2"
    # cfg 1: equivalent, every call across hosts, the one sequence-parallel group spanning the nodes
    assert one["diff"] <= TOL and one["routed"] == 4 and one["crossed"] == 4
    assert one["layouts"] == {"cfg=1,ulysses=2,ring=1": 4}
    assert len(one["lines"]) == 1 and "ring=1 puts sequence-parallel ranks of 2 nodes in one group" in one["lines"][0]
    # cfg 3.5: one CFG branch per node, so no sequence-parallel group (no all-to-all) crosses nodes
    assert cfg["diff"] <= TOL and cfg["routed"] == 4 and cfg["crossed"] == 4
    assert cfg["layouts"]["cfg=2,ulysses=1,ring=1"] == 4 and cfg["spanning"]["cfg=2,ulysses=1,ring=1"] == 0
    assert cfg["lines"] == []  # nothing spans nodes at cfg 3.5
    # the second node killed at step 1: steps 0 and 1 routed, the rest computed here, same image
    killed = seen["killed"]
    assert killed["diff"] <= TOL and killed["fallbacks"] == 1 and killed["routed"] == 2
    assert killed["active"] and killed["group_closed"]
    # the next run: no room for 2 ranks any more; computed here, one line says why, the plugin stays on
    after = seen["after"]
    assert after["diff"] <= TOL and after["routed"] == 0 and after["active"]
    assert after["seconds"] < 120, after
    room = [s for s in after["lines"] if "has room for 1 of 2 ranks" in s]
    assert len(room) == 1, after["lines"]
