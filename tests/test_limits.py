"""runner/limits.py: a run that reached TasksMax= or MemoryMax= is told so, from its cgroup's counters."""

from __future__ import annotations

from pathlib import Path

from runner.limits import warnings

UNIT = "system.slice/system-job.slice/job@1-2-1000.service"


def cgroup_tree(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[str, str]:
    """A fake /proc/self/cgroup and /sys/fs/cgroup; returns their paths."""
    (tmp_path / "proc-cgroup").write_text(proc)
    root = tmp_path / "cgroup"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(tmp_path / "proc-cgroup"), str(root)


def test_cgroup_v2_counters_become_warnings(tmp_path: Path) -> None:
    proc, root = cgroup_tree(
        tmp_path,
        f"0::/{UNIT}\n",
        {
            f"{UNIT}/pids.events": "max 1534\n",
            f"{UNIT}/pids.max": "32\n",
            f"{UNIT}/memory.events": "low 0\nhigh 0\nmax 41\noom 1\noom_kill 1\noom_group_kill 0\n",
            f"{UNIT}/memory.max": f"{128 << 20}\n",
        },
    )

    assert warnings(proc, root) == [
        "the job reached the unit's process limit (TasksMax=32): 1534 forks were refused",
        "the job reached the unit's memory limit (MemoryMax=128M): "
        "the kernel's out-of-memory killer stopped 1 process",
    ]


def test_cgroup_v1_hierarchies_are_found_by_controller(tmp_path: Path) -> None:
    proc, root = cgroup_tree(
        tmp_path,
        f"9:name=systemd:/{UNIT}\n8:pids:/{UNIT}\n4:memory,foo:/{UNIT}\n1:cpu:/\n0::/{UNIT}\n",
        {
            f"pids/{UNIT}/pids.events": "max 1\n",
            f"pids/{UNIT}/pids.max": "64\n",
            f"memory/{UNIT}/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
            f"memory/{UNIT}/memory.limit_in_bytes": f"{3 << 30}\n",
            # The v2 files of the same unit do not count: v1 owns these controllers here.
            f"{UNIT}/pids.events": "max 99\n",
        },
    )

    assert warnings(proc, root) == [
        "the job reached the unit's process limit (TasksMax=64): 1 fork was refused",
        "the job reached the unit's memory limit (MemoryMax=3G): "
        "the kernel's out-of-memory killer stopped 3 processes",
    ]


def test_nothing_reached_nothing_said(tmp_path: Path) -> None:
    proc, root = cgroup_tree(
        tmp_path,
        f"0::/{UNIT}\n",
        {
            f"{UNIT}/pids.events": "max 0\n",
            f"{UNIT}/pids.max": "32\n",
            f"{UNIT}/memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
            f"{UNIT}/memory.max": "max\n",
        },
    )

    assert warnings(proc, root) == []


def test_no_controllers_no_cgroup_file_nothing_said(tmp_path: Path) -> None:
    proc, root = cgroup_tree(tmp_path, f"0::/{UNIT}\n", {f"{UNIT}/cgroup.procs": "1\n"})

    assert warnings(proc, root) == []
    assert warnings(str(tmp_path / "missing"), root) == []


def test_an_oom_kill_without_a_unit_limit_is_the_machine_running_out(tmp_path: Path) -> None:
    unlimited_v1 = "9223372036854771712"
    proc, root = cgroup_tree(
        tmp_path,
        f"4:memory:/{UNIT}\n",
        {
            f"memory/{UNIT}/memory.oom_control": "oom_kill 2\n",
            f"memory/{UNIT}/memory.limit_in_bytes": unlimited_v1,
        },
    )

    assert warnings(proc, root) == [
        "the machine ran out of memory: the kernel's out-of-memory killer stopped 2 processes"
    ]


def test_odd_sizes_are_said_in_bytes(tmp_path: Path) -> None:
    proc, root = cgroup_tree(
        tmp_path,
        f"0::/{UNIT}\n",
        {f"{UNIT}/memory.events": "oom_kill 1\n", f"{UNIT}/memory.max": "1000000\n"},
    )

    assert warnings(proc, root) == [
        "the job reached the unit's memory limit (MemoryMax=1000000): "
        "the kernel's out-of-memory killer stopped 1 process"
    ]
