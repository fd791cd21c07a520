"""bench/client.py: the latency mode times every target once a round, in an order that changes from round
to round (a fixed order gives each target the same predecessor, which moved the floor on systemd 252);
the streaming mode finds the runner's processes to sample their memory."""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from pytest_mock import MockerFixture

from tests.test_imports import job_service_command

CLIENT = Path(__file__).resolve().parents[1] / "bench" / "client.py"
NAMES = ["floor-bare", "floor", "product", "jobctl", "first"]


def load_script(path: Path) -> ModuleType:
    """A bench/ script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_client() -> ModuleType:
    return load_script(CLIENT)


def run_latency(
    mocker: MockerFixture, seed: int, requests: int = 40, warmup: int = 3
) -> tuple[Any, list[str]]:
    client = load_client()
    called: list[str] = []

    def one(target: dict[str, Any]) -> tuple[float, float]:
        called.append(target["name"])
        return 0.001 * len(called), 0.002 * len(called)

    mocker.patch.object(client, "one", side_effect=one)
    targets = [{"name": name, "kind": "exec", "argv": ["true"]} for name in NAMES]
    results = client.latency({"targets": targets, "requests": requests, "warmup": warmup, "seed": seed})
    assert [t["name"] for t in targets] == NAMES, "the caller's list is left as it was"
    return results, called[warmup * len(NAMES) :]


def rounds_of(timed: list[str]) -> list[list[str]]:
    return [timed[i : i + len(NAMES)] for i in range(0, len(timed), len(NAMES))]


def test_every_target_is_timed_once_a_round(mocker: MockerFixture) -> None:
    results, timed = run_latency(mocker, seed=1)
    rounds = rounds_of(timed)
    assert len(rounds) == 40
    assert all(sorted(r) == sorted(NAMES) for r in rounds)
    assert {name: len(results[name]["total"]) for name in NAMES} == dict.fromkeys(NAMES, 40)


def test_no_target_always_follows_the_same_one(mocker: MockerFixture) -> None:
    _, timed = run_latency(mocker, seed=1)
    predecessors: dict[str, set[str]] = {name: set() for name in NAMES}
    for before, after in itertools.pairwise(timed):
        predecessors[after].add(before)
    assert all(len(found) >= 3 for found in predecessors.values()), predecessors


def test_the_seed_makes_a_run_repeatable(mocker: MockerFixture) -> None:
    _, first = run_latency(mocker, seed=7)
    _, again = run_latency(mocker, seed=7)
    _, other = run_latency(mocker, seed=8)
    assert first == again
    assert first != other


def test_runner_processes_finds_a_runner_started_by_job_service() -> None:
    # The streaming pass samples the runner's peak memory through this: it must know job@'s command line.
    _, *options, _ = job_service_command()
    # A sleeper that carries job@'s options as its arguments: the same words in /proc/PID/cmdline.
    runner_like = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", *options])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "runner"])
    try:
        found = load_client().runner_processes()
        assert runner_like.pid in found
        assert other.pid not in found
    finally:
        for proc in (runner_like, other):
            proc.kill()
            proc.wait()
