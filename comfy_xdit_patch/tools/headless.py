"""ComfyUI run headless: `main.py` as a subprocess on loopback, stock API-format workflows POSTed to it.

Used by the demo (`cli demo`) and by the server end-to-end test, so both exercise the plugin the
way a user's ComfyUI does: installed in custom_nodes/, switched by environment variables.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

DEMO_NODES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_nodes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, comfyui: str, base_dir: str, env: dict | None = None, cpu: bool = False,
                 log_path: str | None = None, extra_args: tuple = ()):
        self.comfyui, self.base_dir, self.cpu = comfyui, base_dir, cpu
        self.env = dict(os.environ, **(env or {}))
        # compiled code and the last model (driver/last_run.py) per base directory, not the user's own cache
        self.env.setdefault("COMFY_XDIT_CACHE_DIR", os.path.join(base_dir, "xdit-cache"))
        # a test's or the demo's first prompt is there to be routed, not to run while the group starts
        self.env.setdefault("COMFY_XDIT_WHILE_STARTING", "wait")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(base_dir, f"comfyui-{self.port}.log")
        self.extra_args = list(extra_args)
        self.proc = None
        self.up_seconds = None  # from its launch to its first HTTP answer

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 300) -> "Server":
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base_dir, "--disable-auto-launch", *self.extra_args]
        if self.cpu:
            cmd.append("--cpu")
        if importlib.util.find_spec("comfyui_frontend_package") is None:  # headless: no page is ever served
            empty = os.path.join(self.base_dir, "no_frontend")
            os.makedirs(empty, exist_ok=True)
            cmd += ["--front-end-root", empty]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        launched = time.monotonic()
        deadline = launched + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                self._get("/system_stats")
                self.up_seconds = time.monotonic() - launched
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not start within {timeout:.0f}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def _get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def run(self, workflow: dict, timeout: float = 1800, client_id: str | None = None) -> dict:
        """Queue a workflow and wait for it. Returns {"seconds", "images", "latents", "history"}. client_id:
        the websocket client that gets this prompt's progress messages."""
        return self.wait(self.submit(workflow, client_id), timeout)

    def submit(self, workflow: dict, client_id: str | None = None) -> str:
        """Queue a workflow; its prompt id."""
        body = json.dumps({"prompt": workflow, "client_id": client_id or uuid.uuid4().hex}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"ComfyUI refused the workflow: {e.read().decode(errors='replace')}") from e

    def interrupt(self) -> None:
        req = urllib.request.Request(self.url + "/interrupt", data=b"{}", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).close()

    def wait(self, prompt_id: str, timeout: float = 1800, ok: bool = True, poll=None) -> dict:
        """Wait for a queued prompt; with ok=False a failed or interrupted one is returned too (its
        "status"). poll: called every 0.1 s while waiting (a test watching for a moment)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log()[-3000:]}")
            history = self._get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return self._result(history[prompt_id], ok)
            if poll is not None:
                poll()
            time.sleep(0.1)
        raise TimeoutError(f"workflow not done within {timeout:.0f}s:\n{self.log()[-3000:]}")

    def _result(self, entry: dict, ok: bool = True) -> dict:
        status = entry["status"]
        if ok and status.get("status_str") != "success":
            raise RuntimeError(f"workflow failed: {json.dumps(status)[-3000:]}\n{self.log()[-3000:]}")
        stamps = {name: data.get("timestamp") for name, data in status.get("messages", [])}
        end = stamps.get("execution_success") or stamps.get("execution_interrupted") or stamps.get("execution_error")
        seconds = (end - stamps["execution_start"]) / 1000.0 if end and "execution_start" in stamps else None
        files = {kind: [os.path.join(self.base_dir, "output", f.get("subfolder", ""), f["filename"])
                        for out in entry.get("outputs", {}).values() for f in out.get(kind, [])]
                 for kind in ("images", "latents")}
        return {"seconds": seconds, **files, "status": status.get("status_str"), "history": entry}

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        self.proc = None


def prepare_base(base_dir: str, plugin_dir: str) -> str:
    """A ComfyUI --base-directory with the plugin installed by install.py and the demo node pack."""
    for sub in ("custom_nodes", "models/diffusion_models", "models/vae", "models/checkpoints", "output", "input"):
        os.makedirs(os.path.join(base_dir, sub), exist_ok=True)
    subprocess.check_call([sys.executable, os.path.join(plugin_dir, "install.py"), "--no-deps",
                           "--base-directory", base_dir], stdout=subprocess.DEVNULL)
    link = os.path.join(base_dir, "custom_nodes", "xdit_demo_nodes")
    if not os.path.lexists(link):
        os.symlink(DEMO_NODES, link)
    return base_dir


def flux_workflow(width: int, height: int, steps: int, seed: int = 0, cfg: float = 1.0, unet: str | None = None,
                  vae: str | None = None, checkpoint: str | None = None, prompt: str = "a lighthouse at dawn",
                  context_dim: int = 4096, sampler: str = "euler", scheduler: str = "simple",
                  prefix: str = "xdit") -> dict:
    """The stock FLUX text-to-image graph: loader -> KSampler -> VAEDecode -> SaveImage.

    With `checkpoint` (an all-in-one FLUX file) the prompt is encoded by its own text encoders;
    with `unet` the conditioning comes from the demo node (T5-shaped random tensors).
    """
    wf = {
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
            "scheduler": scheduler, "positive": ["positive", 0], "negative": ["negative", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }
    if checkpoint:
        wf["model"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}
        wf["encode"] = {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["model", 1]}}
        wf["positive"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["encode", 0], "guidance": 3.5}}
        wf["empty"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["model", 1]}}
        wf["negative"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["empty", 0], "guidance": 3.5}}
        wf["decode"]["inputs"]["vae"] = ["model", 2]
        return wf
    wf["model"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}}
    for name, s in (("positive", seed + 1), ("negative", seed + 2)):
        wf[name] = {"class_type": "XDitDemoConditioning", "inputs": {
            "seed": s, "tokens": 512 if context_dim == 4096 else 8, "dim": context_dim, "guidance": 3.5}}
    wf["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae}}
    return wf
