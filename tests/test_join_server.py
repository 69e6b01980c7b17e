"""A Ray cluster that can't be joined, through a real ComfyUI server (COMFY_XDIT_WHILE_STARTING=wait, as test
servers run): at one address, in turn, nothing listens, a listener that never answers, a Ray head with another
token, then the right head. Each prompt is done within the start's bound plus a margin, computed in ComfyUI's
process with the same image; the log names the address and the cause once per try; the status says broken,
with the next try; once the right cluster is up, a later prompt is routed without a restart."""
import os
import re
import time

import numpy as np
import pytest
from PIL import Image

from comfy_xdit_patch.tools import headless, synthetic
from conftest import COMFYUI
from test_join import OTHER, TOKEN, Head, Listener, free_port

START_TIMEOUT = 30  # COMFY_XDIT_START_TIMEOUT: the bound of each try to join
MARGIN = 60  # a tiny prompt on CPU in ComfyUI's process, on a busy 2-core machine
WORKFLOW = headless.flux_workflow(96, 80, steps=4, seed=5, unet="tiny_flux.safetensors",
                                  vae="tiny_taesd16.safetensors", context_dim=synthetic.TINY_CONTEXT_DIM)
ROUTED = re.compile(r"(\d+) of (\d+) model calls ran on the 2-rank worker group")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, router):
    router.close_group()  # 2 cores: the server's ranks get them to themselves
    base = headless.prepare_base(str(tmp_path_factory.mktemp("join_base")), os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    synthetic.save(synthetic.tiny_flux(seed=0), os.path.join(base, "models/diffusion_models/tiny_flux.safetensors"))
    synthetic.save(synthetic.taesd_vae(16, seed=0), os.path.join(base, "models/vae/tiny_taesd16.safetensors"))
    return base


def image(result) -> np.ndarray:
    return np.asarray(Image.open(result["images"][0])).astype(np.int16)


@pytest.mark.slow  # ~4 min: a server and two Ray heads of its own
def test_an_unreachable_cluster_is_bounded_said_shown_and_joined_once_up(base_dir, tmp_path):
    host, port = "127.0.0.2", free_port("127.0.0.2")  # Ray keeps 127.0.0.2 as it is (it rewrites 127.0.0.1)
    address = f"{host}:{port}"
    env = {"COMFY_XDIT": "1", "COMFY_XDIT_WORKERS": "2", "COMFY_XDIT_RAY_ADDRESS": address,
           "COMFY_XDIT_START_TIMEOUT": str(START_TIMEOUT), "COMFY_XDIT_JOIN_RETRY": "1",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "HOME": str(tmp_path)}  # no ~/.ray token of the user's
    said = f"can't join the Ray cluster at {address}"
    heads = []
    with headless.Server(COMFYUI, base_dir, env=env, cpu=True, extra_args=("--cache-none",),  # each prompt samples
                         log_path=os.path.join(base_dir, "join.log")) as server:

        def local_run(cause: str):
            tries = server.log().count(said)
            status = server._get("/xdit/status?ranks=0")
            fallbacks = status["fallbacks"]
            while status["next_try"] and status["next_try"] > time.time():  # the back-off: this prompt tries again
                time.sleep(0.2)
                status = server._get("/xdit/status?ranks=0")
            t0 = time.monotonic()
            result = server.run(WORKFLOW, timeout=600)
            took = time.monotonic() - t0
            status = server._get("/xdit/status?ranks=0")
            lines = [line for line in server.log().splitlines() if said in line]
            assert took < START_TIMEOUT + MARGIN, took
            assert len(lines) == tries + 1 and cause in lines[-1], lines[tries:]
            assert status["state"] == "broken" and cause in status["detail"] and status["next_try"], status
            assert status["enabled"] and status["fallbacks"] == fallbacks + 1 and status["routed_calls"] == 0
            assert status["last_fallback"]["error"].startswith("ClusterUnreachable")
            return image(result)

        try:
            nothing = local_run("nothing listens at")
            silent = Listener(None, host, port)
            try:
                assert (local_run("is not answering as a Ray GCS") == nothing).all()
            finally:
                silent.close()
            heads.append(Head(host, port, token=OTHER, cpus=4))
            assert (local_run("refused this process's token") == nothing).all()
            heads.pop().stop()
            heads.append(Head(host, port, token=TOKEN, cpus=4))
            status = server._get("/xdit/status?ranks=0")
            while status["next_try"] and status["next_try"] > time.time():
                time.sleep(0.2)
                status = server._get("/xdit/status?ranks=0")
            routed = image(server.run(WORKFLOW, timeout=600))
            log, status = server.log(), server._get("/xdit/status?ranks=0")
        finally:
            for head in heads:
                head.stop()
    assert ROUTED.findall(log)[-1] == ("4", "4"), log[-3000:]
    assert status["state"] == "ready" and status["next_try"] is None, status
    assert np.abs(routed - nothing).max() <= 1
