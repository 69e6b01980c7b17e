"""The private Ray cluster, the rendezvous and the per-step connections listen on loopback only."""
import ipaddress
import os

import psutil

import tiny
from conftest import ksample


def _loopback(ip: str) -> bool:
    if ip.startswith("::ffff:"):
        ip = ip[len("::ffff:"):]
    return ipaddress.ip_address(ip).is_loopback


def test_no_socket_listens_beyond_loopback(router, load_flux, tiny_flux):
    ksample(load_flux(tiny_flux), tiny.conditioning(1), tiny.conditioning(2), tiny.latent(64, 64), steps=1)
    assert router.group is not None
    me = psutil.Process(os.getpid())
    tree = {me.pid} | {p.pid for p in me.children(recursive=True)}  # GCS, raylet, ranks, agents
    assert set(router.group.pids) <= tree
    names = {psutil.Process(p).name() for p in tree if psutil.pid_exists(p)}
    assert any("raylet" in n for n in names) and any("gcs_server" in n for n in names)
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in tree]
    assert listening, "expected Ray's servers in the process tree"
    exposed = [(c.laddr, psutil.Process(c.pid).name()) for c in listening if not _loopback(c.laddr.ip)]
    assert not exposed, f"listening beyond loopback: {exposed}"
    # no dashboard web UI (8265) and no Ray client server (10001), on any address
    assert not {c.laddr.port for c in listening} & {8265, 10001}
