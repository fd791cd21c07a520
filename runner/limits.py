"""Whether a run ran into the unit's resource limits (TasksMax=, MemoryMax=): its cgroup's own counters.

systemd enforces both limits on the unit's cgroup. The kernel counts the forks it refused there
(`pids.events`: max) and the processes its out-of-memory killer stopped (`memory.events`: oom_kill on
cgroup v2, `memory.oom_control` on v1). A job that hits them only times out, or dies of SIGKILL, which
says nothing about why; these counters do. Every run has a unit (and so a cgroup) of its own, so counts
above zero are this run's. Where a controller is missing (then its limit is not enforced either, as in
some containers) there is nothing to read and nothing to say.
"""

from __future__ import annotations

import os

CGROUP_ROOT = "/sys/fs/cgroup"
UNLIMITED_BYTES = 1 << 62  # cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages)


def warnings(proc_cgroup: str = "/proc/self/cgroup", root: str = CGROUP_ROOT) -> list[str]:
    """One sentence per limit the run reached, for the exit event and the run log; [] when none."""
    paths = _controller_paths(proc_cgroup, root)
    said = []
    pids = paths.get("pids", "")
    refused = _counter(pids, "pids.events", "max")
    if refused:
        limit = _read(pids, "pids.max") or "?"
        forks = "fork was" if refused == 1 else "forks were"
        said.append(f"the job reached the unit's process limit (TasksMax={limit}): {refused} {forks} refused")
    memory = paths.get("memory", "")
    killed = _counter(memory, "memory.events", "oom_kill")  # cgroup v2
    killed = killed or _counter(memory, "memory.oom_control", "oom_kill")  # cgroup v1
    if killed:
        processes = "process" if killed == 1 else "processes"
        stopped = f"the kernel's out-of-memory killer stopped {killed} {processes}"
        limit = _size(_read(memory, "memory.max") or _read(memory, "memory.limit_in_bytes"))
        if limit:
            said.append(f"the job reached the unit's memory limit (MemoryMax={limit}): {stopped}")
        else:
            said.append(f"the machine ran out of memory: {stopped}")
    return said


def _controller_paths(proc_cgroup: str, root: str) -> dict[str, str]:
    """The pids and memory cgroup directories of this process: a cgroup v1 line names its own, the
    cgroup v2 line ("0::PATH") serves those without one."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    paths: dict[str, str] = {}
    unified = None
    for line in lines:
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not controllers:
            unified = path
        for controller in controllers.split(","):
            if controller in ("pids", "memory"):
                paths[controller] = os.path.join(root, controller, path.lstrip("/"))
    for controller in ("pids", "memory"):
        if controller not in paths and unified is not None:
            paths[controller] = os.path.join(root, unified.lstrip("/"))
    return paths


def _read(directory: str, name: str) -> str:
    if not directory:
        return ""
    try:
        with open(os.path.join(directory, name)) as f:
            return f.read().strip()
    except OSError:
        return ""


def _counter(directory: str, name: str, key: str) -> int:
    """The value of `key` in a flat-keyed cgroup file ("key value" lines); 0 when absent."""
    for line in _read(directory, name).splitlines():
        field, _, value = line.partition(" ")
        if field == key and value.strip().isdigit():
            return int(value)
    return 0


def _size(limit: str) -> str:
    """A byte limit as systemd writes it (128M, 2G); "" when there is none."""
    if not limit.isdigit() or int(limit) >= UNLIMITED_BYTES:
        return ""
    size = int(limit)
    for shift, suffix in ((40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{suffix}"
    return str(size)
