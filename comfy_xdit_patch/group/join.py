"""Bounded join of an existing Ray cluster (issue 29). `ray.init(address=...)` has no deadline of its own: with
nothing listening, or a listener that never answers, it tries 20 x ~41 s (~14 min) before ConnectionError; with
a hung raylet on this machine it ends the whole process (~30 s). probe() says within `timeout` whether a join
can work, or why not in words a user acts on; join() probes, then runs ray.init on a thread up to the deadline.
Imports no torch. Ray internals are marked NOTE (checked on Ray 2.60.0, Python 3.11; heads 2.59.0 and 2.9.3).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import threading
import time

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # HTTP/2 preface + SETTINGS
_TOKEN = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token for ComfyUI (`ray get-auth-token` on the head)"
_lock = threading.Lock()
_pending: list = []  # the thread of a ray.init that outlived its join's deadline


def _grpc(host: str, port: int, shown: str, timeout: float, what: str = "a Ray GCS") -> str | None:
    """None if host:port answers HTTP/2's preface with a SETTINGS frame, as a gRPC server (GCS, raylet) does."""
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return f"nothing listens at {shown} (connection refused)"
    except socket.timeout:
        return f"{shown} did not accept a TCP connection within {timeout:.0f}s (host down or port filtered?)"
    except OSError as e:
        return f"cannot connect to {shown}: {e.strerror or e}"
    try:
        s.settimeout(timeout)
        s.sendall(_PREFACE)
        head = s.recv(9)
    except socket.timeout:
        return f"{shown} accepts connections but is not answering as {what} (no gRPC reply in {timeout:.0f}s)"
    except OSError:
        head = b""
    finally:
        s.close()
    tls = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")  # a TLS server rejects a cleartext preface
    ok = tls or (len(head) >= 4 and head[3] == 4)  # frame header: 3-byte length, type (4: SETTINGS)
    return None if ok else f"{shown} accepts connections but does not speak gRPC: not {what}"


def probe(address: str, timeout: float = 10.0) -> str | None:
    """None if this process can join the Ray cluster at `address` (host:port) as a driver now, else why not.
    Returns within `timeout`; a GCS call past it is left on a daemon thread that ends within timeout + 10 s."""
    deadline = time.monotonic() + timeout
    left = lambda: max(deadline - time.monotonic(), 0.05)  # noqa: E731
    import ray
    import ray._private.services as services
    from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, InnerGcsClient, get_authentication_mode
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    try:  # NOTE: ray.init dials this: 127.0.0.1/localhost become this node's IP (services.py)
        target = services.canonicalize_bootstrap_address(address)
        host, port = services.parse_address(target)
        port = int(port)
    except Exception as e:
        return f"COMFY_XDIT_RAY_ADDRESS={address!r} is not a Ray address host:port ({e})"
    shown = address if target == address else f"{address} (Ray dials {target})"
    # NOTE: a GCS answers the preface at once; a listener silent for 10 s is not one, whatever the start's budget
    cause = _grpc(host, port, shown, min(left(), 10.0))
    if cause:
        return cause + (f": is the Ray head up (`ray start --head --port {port}`), is this its GCS address?"
                        if cause.startswith("nothing") else "")
    token_mode = get_authentication_mode() == AuthenticationMode.TOKEN
    # NOTE: in token mode with no token, Ray's C++ gRPC client aborts the process (RAY_CHECK): ask first
    if token_mode and not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        return f"RAY_AUTH_MODE=token but this process has no Ray token: set {_TOKEN}"
    out: list = []

    def ask():  # NOTE: InnerGcsClient.standalone(address, cluster_id, timeout_ms) connects and gets the cluster
        try:    # id; its waits are bounded by timeout_ms once the server speaks gRPC (checked above)
            gcs = InnerGcsClient.standalone(target, None, int(left() * 1000))
            meta = gcs.internal_kv_get(b"CLUSTER_METADATA", namespace=b"cluster", timeout=left())
            out.append((meta, gcs.get_all_node_info(timeout=left(), state_filter=GcsNodeInfo.GcsNodeState.ALIVE)))
        except Exception as e:
            out.append(e)

    thread = threading.Thread(target=ask, name="comfy-xdit-ray-probe", daemon=True)
    thread.start()
    thread.join(left())
    if not out:
        return f"{shown} answers gRPC but no Ray GCS reply came within {timeout:.0f}s"
    if isinstance(out[0], ray.exceptions.AuthenticationError):
        if not token_mode:
            return f"the Ray cluster at {shown} requires token authentication: set RAY_AUTH_MODE=token and {_TOKEN}"
        return f"the Ray cluster at {shown} refused this process's token: set the cluster's token in {_TOKEN}"
    if isinstance(out[0], Exception):
        return f"{shown} answers gRPC but not as a Ray GCS ({type(out[0]).__name__}: {out[0]})"
    meta, alive = out[0]
    cause = _version(json.loads(meta) if meta else {}, shown)
    if cause:
        return cause
    # NOTE: the driver attaches to a raylet on this machine: services.find_node_ids() reads the local raylets'
    # --node_id flags. None of this cluster's: ray.init fails after 60 s. One not answering: Ray's core worker
    # ends the whole process ("Failed to get the system config from raylet"), so it is asked here first.
    local = [n for nid, n in alive.items() if nid.hex() in set(services.find_node_ids())]
    if not alive:
        return f"the Ray cluster at {shown} has no alive node yet (its head still starting?)"
    if not local:
        return (f"no node of the Ray cluster at {shown} runs on this machine: ComfyUI must run on one of its "
                f"nodes (`ray start --address {address}` here first)")
    for n in local:
        cause = _grpc(n.node_manager_address, n.node_manager_port,
                      f"the raylet at {n.node_manager_address}:{n.node_manager_port}", left(), "a raylet")
        if cause:
            return f"the Ray node on this machine is not usable ({cause}); ray.init would end this process"
    return None


def _version(meta: dict, shown: str) -> str | None:
    """NOTE: Ray's rule (_private/utils.py check_version_info): the same Ray, and Python to the patch (or
    RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor: minor) version."""
    import ray

    theirs, mine = (meta.get("ray_version"), meta.get("python_version")), (ray.__version__, platform.python_version())
    level = 2 if os.environ.get("RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL", "patch") == "minor" else 3
    if not theirs[0] or (theirs[0] == mine[0] and theirs[1].split(".")[:level] == mine[1].split(".")[:level]):
        return None
    return (f"the Ray cluster at {shown} runs Ray {theirs[0]} on Python {theirs[1]}, this ComfyUI has Ray {mine[0]} "
            f"on Python {mine[1]}: Ray needs the same versions on both")


def join(address: str, timeout: float = 60.0, **init_kwargs) -> str | None:
    """Connect this process to the cluster at `address` as a driver within `timeout`: None when connected, else
    why not. One ray.init at a time: one that outlived an earlier join's deadline is waited on, not doubled."""
    deadline = time.monotonic() + timeout
    import ray

    with _lock:
        if _pending:
            _pending[0].join(max(deadline - time.monotonic(), 0))
            if _pending[0].is_alive():
                return ("an earlier ray.init is still running (Ray gives up on its own: ~41 s x "
                        "RAY_NUM_REDIS_GET_RETRIES, 20 by default)")
            _pending.clear()
        if ray.is_initialized():
            return None
        # NOTE: Ray caches the token per process: a token file fixed since the last join is read only after this
        ray._raylet.AuthenticationTokenLoader.instance().reset_cache()
        cause = probe(address, max(deadline - time.monotonic(), 0.1))
        if cause:
            return cause
        result: list = []

        def init():
            try:
                ray.init(address=address, **init_kwargs)
                result.append(None)
            except BaseException as e:  # noqa: BLE001 (handed to the caller)
                result.append(f"ray.init({address!r}) failed: {type(e).__name__}: {e}")
                with contextlib.suppress(Exception):  # NOTE: a failed connect() (version mismatch) leaves
                    ray.shutdown()                     # ray._private.worker._global_node set

        thread = threading.Thread(target=init, name="comfy-xdit-ray-join", daemon=True)
        thread.start()
        thread.join(max(deadline - time.monotonic(), 0))
        if thread.is_alive():
            _pending.append(thread)
            return f"ray.init({address!r}) did not finish within {timeout:.0f}s; the next join waits for it"
        return result[0]
