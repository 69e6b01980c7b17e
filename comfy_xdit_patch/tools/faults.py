"""The fault matrix: one ComfyUI server (main.py --cpu, the plugin on, 2 CPU ranks) takes a fault at each
moment of a worker group's life; each prompt must still give ComfyUI's own latent, nothing may wait
longer than the configured timeout + 10 s, the next prompt must be routed again, and nothing may be
left behind. Writes the table of docs/reliability.md.

    python -m comfy_xdit_patch.tools.faults --out docs/reliability.md   (the test runs the same code)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import tempfile
import time

from safetensors.torch import load_file

from .. import locate
from . import headless, procs, synthetic

# NOTE: tests/inject/sitecustomize.py, on the path of the server and its ranks: each rank holds 1 s in
# `prepare`, for (c) and (e); a 'sampling' fault lands while the sampler is held at step HOLD_STEP
HOLD_STEP = 2
ENV = {"COMFY_XDIT": "1", "COMFY_XDIT_WORKERS": "2", "COMFY_XDIT_TIMEOUT": "15", "COMFY_XDIT_START_TIMEOUT": "120",
       "COMFY_XDIT_LOAD_TIMEOUT": "120", "COMFY_XDIT_PRESTART": "1", "XDIT_TEST_PAUSE": "prepare=1",
       "PYTHONPATH": os.pathsep.join(filter(None, (os.path.join(locate.CHECKOUT, "tests", "inject"),
                                                   os.environ.get("PYTHONPATH"))))}
TOL = 1e-4
UNET, LORA = "tiny_flux.safetensors", "tiny_lora.safetensors"
SIZE, STEPS = 128, 10  # a fault at step 2 lands mid-sampling (steps take 0.1-0.5 s on a busy 2-core machine)
ROUTED = re.compile(r"(\d+) of (\d+) model calls ran on the 2-rank worker group")
# (e) needs the group of (h) with the base model loaded; (b) and (c) start after a failed run left no group;
# (j) and (J) need a group up and warm, which (g)'s next prompt leaves
CASES = "adfheibcgGjJ"


def prepare(base_dir: str) -> str:
    headless.prepare_base(base_dir, locate.CHECKOUT)
    sd = synthetic.tiny_flux(seed=0)
    synthetic.save(sd, os.path.join(base_dir, "models/diffusion_models", UNET))
    os.makedirs(os.path.join(base_dir, "models/loras"), exist_ok=True)
    synthetic.save(synthetic.lora(sd, rank=4, seed=1, scale=0.1), os.path.join(base_dir, "models/loras", LORA))
    return base_dir


def workflow(size: int = SIZE, steps: int = STEPS, seed: int = 5, cfg: float = 1.0, lora: float | None = None) -> dict:
    """The stock FLUX graph ending in SaveLatent (the latent itself is compared, not a decoded image)."""
    wf = headless.flux_workflow(size, size, steps, seed=seed, cfg=cfg, unet=UNET, vae="unused",
                                context_dim=synthetic.TINY_CONTEXT_DIM)
    for node in ("vae", "decode", "save"):
        del wf[node]
    wf["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": "latents/x"}}
    if lora is not None:
        wf["lora"] = {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": ["model", 0], "lora_name": LORA, "strength_model": lora}}
        wf["sampler"]["inputs"]["model"] = ["lora", 0]
    return wf


def latent(result: dict):
    return load_file(result["latents"][0])["latent_tensor"]


@dataclasses.dataclass
class Row:
    case: str
    outcome: str = ""
    delta: float | None = None  # max |latent - ComfyUI alone's| of the faulted prompt (None: interrupted)
    wait: float | None = None  # seconds from the fault to the fallback (or to the prompt's end)
    routed_next: str = ""
    leftovers: str = ""
    next_delta: float | None = None
    ok: bool = False


class Matrix:
    def __init__(self, server: headless.Server, reference: dict, timeout: float, start_timeout: float):
        self.server, self.reference, self.timeout, self.start_timeout = server, reference, timeout, start_timeout
        self.root = server.proc.pid
        self.hold = server.env["XDIT_TEST_HOLD"].split(":", 1)[1]  # the sampler holds at a step: see ENV
        self.rows: list[Row] = []
        self.after_exit: list[int] = []  # processes the server started that outlived it

    # --- moments and faults -----------------------------------------------------------------------
    def _log(self, mark: int) -> str:
        return self.server.log()[mark:]

    def ranks(self) -> list[int]:
        return procs.ranks(self.root)

    def pauses(self) -> int:
        """How often the current ranks paused in `prepare` (XDIT_TEST_PAUSE), from their own logs."""
        n = 0
        for pid in self.ranks():
            try:
                with open(os.readlink(f"/proc/{pid}/fd/2"), errors="replace") as f:
                    n += f.read().count("diag: pausing")
            except OSError:
                pass
        return n

    def wait_group(self, timeout: float = 180) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.ranks()
            if len(r) == 2:
                return r
            time.sleep(0.2)
        raise TimeoutError(f"no 2-rank group: {procs.descendants(self.root)}")

    def _kill(self, pid: int, sig=signal.SIGKILL) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    # --- one case -----------------------------------------------------------------------------------
    def case(self, name: str, when: str, fault, wf="base", ok=True, fresh=True, before=None) -> Row:
        """when: 'idle' (before the prompt), 'start' (a new rank process appeared), 'ready' (the group is
        up, the model about to load), 'sampling' (the routed run held at step HOLD_STEP until the fault is
        applied). fault(pid) -> pid to clean."""
        row = Row(name)
        old = self.ranks()
        shm0 = procs.shm_segments()
        if before is not None:
            before()
            old = self.ranks()
        mark = len(self.server.log())
        paused = self.pauses()
        state = {"t": None, "detect": None, "victim": None}

        def hit():
            state["t"] = time.monotonic()
            state["victim"] = fault()

        def poll():
            text = self._log(mark)
            if state["t"] is None:
                if when == "start":
                    new = [p for p in self.ranks() if p not in old]
                    if new:
                        hit()
                elif when == "ready" and "worker group ready" in text:
                    hit()
                elif when == "prepare" and self.pauses() > paused:
                    hit()
                elif when == "sampling" and f"diag: holding at step {HOLD_STEP}" in text:
                    hit()
                    open(os.path.join(self.hold, "go"), "w").close()  # the sampler goes on, with the fault
            elif state["detect"] is None and "failed (" in text:
                state["detect"] = time.monotonic()

        if when == "idle":
            hit()
        if when == "sampling":
            open(os.path.join(self.hold, "arm"), "w").close()
        pid = self.server.submit(workflow(**self.reference[wf][0]))
        result = self.server.wait(pid, timeout=600, ok=ok, poll=poll)
        end = time.monotonic()
        poll()
        text = self._log(mark)
        if state["t"] is None:
            row.outcome = f"fault not applied ({when} never seen)"
            return self._done(row)
        row.wait = round((state["detect"] or end) - state["t"], 1)
        m = ROUTED.findall(text)
        calls = f"{m[-1][0]}/{m[-1][1]} routed" if m else "0 routed"
        failure = re.findall(r"failed \((\w+):", text)
        ray_again = "Started a local Ray instance" in text
        # no fallback at all: the run found the fault first (Ray lost) and started Ray and a group anew
        renewed = not failure and "worker group ready" in text and bool(m) and m[-1][0] == m[-1][1]
        limit = self.timeout + 10 if failure or not renewed else self.start_timeout + 10
        row.outcome = (f"{result['status']}, {calls}" + (f", {failure[0]}" if failure else "")
                       + (", Ray started again" if ray_again else "") + (" by a new group" if renewed else ""))
        if result["latents"]:
            row.delta = float((latent(result) - self.reference[wf][1]).abs().max())
        victim = state["victim"]
        if victim is not None and procs.alive(victim):  # a stopped rank: the test cleans up what it stopped
            self._kill(victim, signal.SIGCONT)
        # the next prompt: routed again
        mark = len(self.server.log())
        again = self.server.run(workflow(**self.reference[wf][0]), timeout=600)
        text = self._log(mark)
        m = ROUTED.findall(text)
        started = "worker group ready" in text
        full = bool(m) and m[-1][0] == m[-1][1] != "0"
        row.routed_next = ((f"{m[-1][0]}/{m[-1][1]}" if m else "0") + (" (new group)" if started else " (same group)")
                           + (", Ray started again" if "Started a local Ray instance" in text else ""))
        row.next_delta = float((latent(again) - self.reference[wf][1]).abs().max())
        now = self.ranks()
        left = [p for p in old if procs.alive(p) and p not in now] + [p for p in (victim,) if p and procs.alive(p)
                                                                        and p not in now]
        leaks = procs.shm_leaked(shm0)
        placement = "has not released" in self.server.log()[mark:]
        row.leftovers = ", ".join(filter(None, [f"ranks {left}" if left else "", f"shm {sorted(leaks)}" if leaks else "",
                                                "placement" if placement else ""])) or "none"
        waited_ok = row.wait is not None and row.wait <= limit
        right = (row.delta is None and not ok) or (row.delta is not None and row.delta <= TOL)
        row.ok = (right and row.next_delta <= TOL and full and (started or renewed or not fresh) and waited_ok
                  and row.leftovers == "none" and len(now) == 2 and not set(now) & set(old if fresh else []))
        for p in left:
            self._kill(p)
        return self._done(row)

    def _done(self, row: Row) -> Row:
        self.rows.append(row)
        print(table([row], header=not self.rows[:-1]), flush=True)
        return row

    # --- the cases ----------------------------------------------------------------------------------
    def kill_rank(self, sig=signal.SIGKILL):
        def fault():
            victim = self.ranks()[-1]
            self._kill(victim, sig)
            return victim
        return fault

    def throwaway_failure(self) -> None:
        """Leave no group (a failed run), so that the next prompt starts one."""
        self.kill_rank()()
        self.server.run(workflow(**self.reference["base"][0]), timeout=600)

    def kill_daemon(self, name: str):
        def fault():
            for pid in procs.ray_daemon(self.root, name):
                self._kill(pid)
            return None
        return fault

    def gcs_idle(self):
        """(g) GCS: killed, then left idle until the plugin says it closed the group (driver/life.py, GroupLife._watch), and
        ComfyUI's CPU time measured over the next 3 s (Ray's driver thread spun a core until a FLUX run came)."""
        kill = self.kill_daemon("gcs_server")

        def fault():
            mark = len(self.server.log())
            kill()
            deadline = time.monotonic() + 30
            while "GCS died between runs" not in self._log(mark) and time.monotonic() < deadline:
                time.sleep(0.2)
            before = procs.cpu_seconds(self.root)
            time.sleep(3)
            self.idle_cpu_s = procs.cpu_seconds(self.root) - before
        return fault

    def idle_cpu(self, row: Row) -> Row:
        spent = getattr(self, "idle_cpu_s", None)
        row.outcome += "; idle after it: " + ("not measured" if spent is None else
                                               f"ComfyUI used {spent:.2f} s of CPU in 3 s")
        row.ok = row.ok and spent is not None and spent < 1.0
        return row

    def run_all(self, cases: str = None) -> list[Row]:
        self.wait_group()
        self.server.run(workflow(**self.reference["base"][0]), timeout=600)  # warm: model on the ranks
        table_of = {
            "a": lambda: self.case("(a) rank SIGKILLed, idle between prompts", "idle", self.kill_rank()),
            "d": lambda: self.case("(d) rank SIGKILLed mid-sampling", "sampling", self.kill_rank()),
            "f": lambda: self.case("(f) rank SIGSTOPped mid-sampling (hang)", "sampling", self.kill_rank(signal.SIGSTOP)),
            "h": lambda: self.case("(h) POST /interrupt mid-sampling", "sampling", lambda: self.server.interrupt(),
                                   ok=False, fresh=False),
            "i": lambda: self.back_to_back(),
            "b": lambda: self.case("(b) rank SIGKILLed while the group starts", "start", self.kill_rank(),
                                   before=self.throwaway_failure),
            "c": lambda: self.case("(c) rank SIGKILLed while the ranks load the model", "prepare", self.kill_rank(),
                                   before=self.throwaway_failure),
            "e": lambda: self.case("(e) rank SIGKILLed during a LoRA re-patch", "prepare", self.kill_rank(), wf="lora"),
            "g": lambda: self.case("(g) Ray's raylet SIGKILLed (idle)", "idle", self.kill_daemon("raylet")),
            "G": lambda: self.idle_cpu(self.case("(g) Ray's GCS SIGKILLed (idle)", "idle", self.gcs_idle())),
            "j": lambda: self.case("(j) Ray's raylet SIGKILLed mid-sampling", "sampling", self.kill_daemon("raylet"),
                                   wf="long"),
            "J": lambda: self.case("(j) Ray's GCS SIGKILLed mid-sampling", "sampling", self.kill_daemon("gcs_server"),
                                   wf="long"),
        }
        for c in cases or CASES:
            table_of[c]()
        return self.rows

    def back_to_back(self) -> Row:
        """(i): a rank dies idle; two prompts queued back to back; the first falls back and shuts the
        group down, the second is routed by the fresh group that its run starts."""
        row = Row("(i) two prompts queued back to back during a restart")
        shm0, old = procs.shm_segments(), self.ranks()
        mark = len(self.server.log())
        t = time.monotonic()
        self.kill_rank()()
        ids = [self.server.submit(workflow(**self.reference["base"][0])) for _ in range(2)]
        seen = []

        def poll():
            if not seen and "failed (" in self._log(mark):
                seen.append(time.monotonic())

        first = self.server.wait(ids[0], timeout=600, poll=poll)
        poll()
        row.wait = round((seen or [time.monotonic()])[0] - t, 1)
        second = self.server.wait(ids[1], timeout=600)
        one, two = self._log(mark).split("Prompt executed in", 1)  # ComfyUI's line after each prompt
        m1, m = ROUTED.findall(one), ROUTED.findall(two)
        failure = re.findall(r"failed \((\w+):", one)
        row.outcome = (f"{m1[-1][0]}/{m1[-1][1]} routed" if m1 else "0 routed") + (f", {failure[0]}" if failure else "")
        row.delta = float((latent(first) - self.reference["base"][1]).abs().max())
        row.next_delta = float((latent(second) - self.reference["base"][1]).abs().max())
        started = two.count("worker group ready")
        row.routed_next = (f"{m[-1][0]}/{m[-1][1]}" if m else "0") + (" (new group)" if started else "")
        now = self.ranks()
        left = [p for p in old if procs.alive(p) and p not in now]
        leaks = procs.shm_leaked(shm0)
        row.leftovers = ", ".join(filter(None, [f"ranks {left}" if left else "", f"shm {sorted(leaks)}" if leaks else ""])) or "none"
        row.ok = (row.delta <= TOL and row.next_delta <= TOL and bool(m) and m[-1][0] == m[-1][1] and started == 1
                  and row.leftovers == "none" and row.wait <= self.timeout + 10)
        return self._done(row)


def table(rows: list[Row], header: bool = True) -> str:
    lines = ["| case | faulted prompt | max abs Δ | wait (s) | next prompt routed | left behind | pass |",
             "|---|---|---|---|---|---|---|"] if header else []
    for r in rows:
        d = "interrupted" if r.delta is None else f"{r.delta:.1e}"
        lines.append(f"| {r.case} | {r.outcome} | {d} | {r.wait} | {r.routed_next} (Δ {r.next_delta or 0:.1e}) | "
                     f"{r.leftovers} | {'yes' if r.ok else 'NO'} |")
    return "\n".join(lines)


def references(comfyui: str, base_dir: str, specs: dict) -> dict:
    """name -> (workflow kwargs, ComfyUI alone's latent), from a server with the plugin off."""
    out = {}
    with headless.Server(comfyui, base_dir, env={"COMFY_XDIT": "0"}, cpu=True, extra_args=("--cache-none",),
                         log_path=os.path.join(base_dir, "reference.log")) as server:
        for name, kw in specs.items():
            out[name] = (kw, latent(server.run(workflow(**kw), timeout=600)))
    return out


# NOTE: the ranks outlive Ray's raylet and GCS (channel.py's sockets carry the calls), so (j) runs 3x the
# steps: many routed calls, and the channel's liveness checks (ray.wait), come after the fault
SPECS = {"base": {}, "lora": {"lora": 1.0}, "long": {"steps": 3 * STEPS}}


def run(base_dir: str, cases: str | None = None, env: dict | None = None) -> "Matrix":
    comfyui = locate.import_comfy(cpu=True)  # synthetic weights are made with ComfyUI's model classes
    prepare(base_dir)
    reference = references(comfyui, base_dir, SPECS)
    hold = os.path.join(base_dir, "hold")
    os.makedirs(hold, exist_ok=True)
    env = dict(ENV, XDIT_TEST_HOLD=f"{HOLD_STEP}:{hold}", **(env or {}))
    with headless.Server(comfyui, base_dir, env=env, cpu=True, extra_args=("--cache-none",),
                         log_path=os.path.join(base_dir, "faults.log")) as server:
        matrix = Matrix(server, reference, float(env["COMFY_XDIT_TIMEOUT"]), float(env["COMFY_XDIT_START_TIMEOUT"]))
        try:
            matrix.run_all(cases)
        finally:
            started = list(procs.descendants(server.proc.pid))
            server.stop()
            deadline = time.monotonic() + 30
            while any(procs.alive(p) for p in started) and time.monotonic() < deadline:
                time.sleep(0.2)
            matrix.after_exit = [p for p in started if procs.alive(p)]
    return matrix


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=None, help=f"letters of the cases to run, in order (default {CASES})")
    p.add_argument("--base", default=None, help="ComfyUI base directory to use (default: a new temporary one)")
    p.add_argument("--out", default=None, help="write the table here (markdown)")
    a = p.parse_args(argv)
    matrix = run(a.base or tempfile.mkdtemp(prefix="xdit_faults_"), a.cases)
    rows = matrix.rows
    text = table(rows) + f"\n\nProcesses left after ComfyUI exited: {matrix.after_exit or 'none'}"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
