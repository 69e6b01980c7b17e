"""What a ComfyUI server with the plugin has running, read from /proc (Linux): its ranks, Ray's own
processes, memory, open files, shared-memory segments. Used by the fault matrix and the soak."""
from __future__ import annotations

import os


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int | None:
    stat = _read(f"/proc/{pid}/stat")
    try:
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return None


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of every living descendant of `root` (zombies excluded)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            pid = int(name)
            stat = _read(f"/proc/{pid}/stat")
            if not stat or stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                continue
            parents[pid] = _ppid(pid)
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()
        todo += children.get(pid, [])
    return out


def ranks(root: int) -> list[int]:
    """Pids of the rank actors (Ray titles an actor's process `ray::Worker`)."""
    return sorted(pid for pid, cmd in descendants(root).items() if cmd.startswith("ray::Worker"))


def ray_daemon(root: int, name: str) -> list[int]:
    """Pids of Ray's own processes: name 'raylet' or 'gcs_server'."""
    return sorted(pid for pid, cmd in descendants(root).items() if cmd.split(" ", 1)[0].endswith("/" + name))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far, all its threads."""
    try:
        fields = _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError):
        return 0.0


def rss_mib(pid: int) -> float:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def shm_segments() -> set[str]:
    """Python shared-memory segments (multiprocessing names them psm_*)."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}
    except OSError:
        return set()


def shm_in_use() -> set[str]:
    """psm_* segments some process on this machine maps or holds open."""
    used = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        for line in _read(f"/proc/{name}/maps").splitlines():
            if "/dev/shm/psm_" in line:
                used.add(line.rsplit("/", 1)[1].split()[0])
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                target = os.readlink(f"/proc/{name}/fd/{fd}")
                if target.startswith("/dev/shm/psm_"):
                    used.add(target.rsplit("/", 1)[1].split()[0])
        except OSError:
            pass
    return used


def shm_leaked(before: set[str]) -> set[str]:
    """Segments made since `before` that no process maps or holds: left behind."""
    return (shm_segments() - before) - shm_in_use()


def alive(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
