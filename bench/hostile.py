"""Figures for README: jobrunner under hostile conditions, in a throwaway Debian container with real systemd.

    sudo python3 bench/hostile.py [--distro bookworm] [--distro trixie] [--json PATH]
    python3 bench/hostile.py --from-json PATH      (the table of an earlier run)

Boots the container (tests/e2e/container.py), installs jobrunner as the end-to-end tests do, and runs
the load, fault, bad-input and secret cases of tests/e2e/test_hostile.py (the same functions the tests
assert on), then prints one table. Exit status 0 when every "must be 0" figure is 0 and every fault case
was survived, 1 otherwise, 77 when not run as root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e import test_hostile as hostile  # noqa: E402 - after the path is set
from tests.e2e.container import DISTROS, EXPECTED_SYSTEMD, Container  # noqa: E402

LOAD_CASES = ("load", "concurrency-reject", "concurrency-queue", "concurrency-parallel", "per-user-limit")
FAULT_CASES = (
    "fault-",
    "client-stalls",
    "full-disk",
    "credential-",
    "config-",
    "slow-loris",
    "resource-limits",
)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def timed(name: str, case: Callable[[], hostile.Outcome]) -> hostile.Outcome:
    started = time.monotonic()
    try:
        outcome = case()
    except Exception as e:  # a case that blows up is a case not survived, with the reason
        outcome = hostile.Outcome(name, problems=[f"{type(e).__name__}: {e}"[:2000]])
    outcome.figures["seconds"] = round(time.monotonic() - started, 1)
    verdict = "ok" if outcome.survived else f"{len(outcome.problems)} problem(s): {outcome.problems[:3]}"
    progress(f"{name}: {verdict} ({outcome.figures['seconds']} s)")
    return outcome


def run_cases(inst: hostile.Installation) -> list[hostile.Outcome]:
    """Every case of the suite against one installation, in the order the tests run them."""
    outcomes = [timed("load", lambda: hostile.load_burst(inst))]
    for policy in ("reject", "queue", "parallel"):
        outcomes.append(timed(f"concurrency-{policy}", lambda p=policy: hostile.concurrency_policy(inst, p)))
    outcomes.append(timed("per-user-limit", lambda: hostile.per_user_limit(inst)))
    started = time.monotonic()
    runs = hostile.process_faults(inst)
    for run in runs.values():
        outcome = hostile.check_fault_run(run)
        outcome.figures["seconds"] = round(time.monotonic() - started, 1)
        progress(f"{outcome.name}: {'ok' if outcome.survived else outcome.problems[:3]}")
        outcomes.append(outcome)
    outcomes.append(timed("client-stalls", lambda: hostile.client_stalls(inst)))
    outcomes.append(timed("full-disk", lambda: hostile.full_disk(inst)))
    for fault in ("missing", "corrupt", "undecryptable", "expired"):
        outcomes.append(timed(f"credential-{fault}", lambda f=fault: hostile.credential_fault(inst, f)))
    outcomes.append(timed("config-in-flight", lambda: hostile.config_in_flight(inst)))
    outcomes.append(timed("slow-loris", lambda: hostile.slow_loris(inst)))
    outcomes.append(timed("fuzz", lambda: hostile.fuzz_socket(inst)))
    outcomes.append(timed("secrets", lambda: hostile.secrets_in_output(inst)))
    outcomes.append(timed("secrets-in-errors", lambda: hostile.secrets_in_errors(inst)))
    outcomes.append(timed("short-key", lambda: hostile.short_key_refused(inst)))
    return outcomes


def left_behind(inst: hostile.Installation) -> list[str]:
    """After everything: job@ units, runners, or any process a test job started, still there."""
    units = hostile.wait_for_runs_to_end(inst)
    markers = (*hostile.RUNNER_MARKS, "sleep 900", "bomb", "yes the quick", "sleep 3600")
    processes = [line for line in inst.sh("ps -eo args").splitlines() if any(m in line for m in markers)]
    return units + processes


def bench_distro(distro: str) -> dict[str, Any]:
    started = time.monotonic()
    progress(f"{distro}: booting and installing")
    with Container.boot(distro, name="bench", binds_ro={hostile.REPO: "/src"}) as ct:
        inst = hostile.install(ct)
        version = ct.run(["systemctl", "--version"]).stdout.decode().split()[1]
        hostile.prepare(inst)
        outcomes = run_cases(inst)
        leftovers = left_behind(inst)
    limits_note = hostile.limits_unavailable(distro)
    if limits_note is None:
        progress(f"{distro}: booting a cgroup v1 container for TasksMax= and MemoryMax=")
        with hostile.cgroup_v1_container(distro) as ct:
            limited = hostile.install_limited(ct)
            limits_note = hostile.unit_limits_enforced(limited)
            if limits_note is None:
                outcomes.append(timed("resource-limits", lambda: hostile.resource_limits(limited)))
                leftovers += left_behind(limited)
    return {
        "distro": distro,
        "systemd": version,
        "outcomes": [{"name": o.name, "problems": o.problems, "figures": o.figures} for o in outcomes],
        "left_behind": leftovers,
        "limits_not_run": limits_note,
        "seconds": round(time.monotonic() - started, 1),
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The table's figures for one distro."""
    by_name = {o["name"]: o for o in result["outcomes"]}
    load = [by_name[name]["figures"] for name in LOAD_CASES if name in by_name]
    load_failed = [name for name in LOAD_CASES if name in by_name and by_name[name]["problems"]]
    faults = [o for o in result["outcomes"] if o["name"].startswith(FAULT_CASES)]
    fuzz = by_name.get("fuzz", {"figures": {}, "problems": ["not run"]})
    secrets_cases = [by_name[n] for n in ("secrets", "secrets-in-errors") if n in by_name]
    # Leaks the secret cases measured, and any other case that found the key where it looked.
    leaks = sum(o["figures"].get("leaks", 0) for o in secrets_cases)
    leaks += sum(
        1 for o in result["outcomes"] if o not in secrets_cases for p in o["problems"] if "the key" in p
    )
    left = len(result["left_behind"]) + sum(
        o["figures"].get("left_behind", 0) for o in result["outcomes"] if o["name"].startswith("fault-")
    )
    stalls = by_name.get("client-stalls", {"figures": {}})["figures"]
    runner_kb = [stalls.get("runner_kb_after_1gb", 0), stalls.get("runner_kb_stalled", 0)]
    runner_kb += [o["figures"].get("runner_memory_kb", 0) for o in faults]
    loris = by_name.get("slow-loris", {"figures": {}})["figures"]
    return {
        "distro": result["distro"],
        "systemd": result["systemd"],
        "connections_tried": sum(f.get("tried", 0) for f in load),
        "served": sum(f.get("served", 0) for f in load),
        "refused_busy": sum(f.get("busy", 0) for f in load),
        "refused_socket_limit": sum(f.get("refused", 0) for f in load),
        "failed": sum(f.get("failed", 0) for f in load) + len(load_failed),
        "load_cases_failed": load_failed,
        "fault_cases": len(faults),
        "fault_cases_survived": sum(1 for o in faults if not o["problems"]),
        "fault_cases_not_survived": [o["name"] for o in faults if o["problems"]],
        "fuzz_cases": fuzz["figures"].get("cases", 0),
        "fuzz_findings": len(fuzz["problems"]),
        "loris_connections": loris.get("connections", 0),
        "loris_closed_at_deadline": loris.get("closed_at_deadline", 0),
        "loris_refused_by_systemd": loris.get("refused_by_systemd", 0),
        "loris_closed_after_s": loris.get("closed_after_s"),
        "secret_places_checked": sum(
            o["figures"].get("paths", o["figures"].get("places", 0)) for o in secrets_cases
        ),
        "secrets_leaked": leaks,
        "cases_not_passed": [o["name"] for o in result["outcomes"] if o["problems"]],
        "left_behind": left,
        "runner_peak_kb": max(runner_kb, default=0),
        "limits_not_run": result["limits_not_run"],
        "seconds": result["seconds"],
    }


ROWS = (
    ("load", "connections tried", "connections_tried", ""),
    ("", "served (ran to the end)", "served", ""),
    ("", "refused as busy", "refused_busy", ""),
    ("", "refused by the socket limit (job.socket MaxConnections=)", "refused_socket_limit", ""),
    ("", "failed", "failed", "must be 0"),
    ("faults", "cases survived", "faults", "all"),
    ("bad input", "fuzz cases run", "fuzz_cases", ""),
    ("", "fuzz findings", "fuzz_findings", "must be 0"),
    ("", "slow-loris connections closed at the deadline", "loris", "all"),
    ("secrets", "places checked (stream, run log, journal, errors)", "secret_places_checked", ""),
    ("", "secrets leaked", "secrets_leaked", "must be 0"),
    ("processes", "left behind", "left_behind", "must be 0"),
    ("memory", "runner peak (VmHWM), incl. 1 GB of output", "runner_peak", ""),
)


def render(summaries: list[dict[str, Any]]) -> str:
    def value(s: dict[str, Any], key: str) -> str:
        if key == "faults":
            return f"{s['fault_cases_survived']} / {s['fault_cases']}"
        if key == "runner_peak":
            return f"{s['runner_peak_kb'] / 1024:.1f} MiB"
        if key == "loris":
            refused = f" + {s['loris_refused_by_systemd']} refused" if s["loris_refused_by_systemd"] else ""
            return f"{s['loris_closed_at_deadline']}{refused} / {s['loris_connections']}"
        return str(s[key])

    headers = [f"{s['distro']} (systemd {s['systemd']})" for s in summaries]
    width = max(len(label) for _, label, _, _ in ROWS)
    columns = [
        max(len(h), *(len(value(s, k)) for _, _, k, _ in ROWS))
        for h, s in zip(headers, summaries, strict=True)
    ]
    lines = [
        f"{'':<10} {'':<{width}}  " + "  ".join(f"{h:>{c}}" for h, c in zip(headers, columns, strict=True)),
    ]
    for group, label, key, note in ROWS:
        cells = "  ".join(f"{value(s, key):>{c}}" for s, c in zip(summaries, columns, strict=True))
        lines.append(f"{group:<10} {label:<{width}}  {cells}" + (f"  ({note})" if note else ""))
    notes = []
    for s in summaries:
        if s["limits_not_run"]:
            notes.append(f"{s['distro']}: fork bomb and memory hog not run: {s['limits_not_run']}")
        else:
            limits = f"TasksMax={hostile.LIMITS['tasks_max']}, MemoryMax={hostile.LIMITS['memory_max']}"
            notes.append(
                f"{s['distro']}: fork bomb and memory hog contained in a cgroup v1 container ({limits})"
            )
        if s["cases_not_passed"]:
            notes.append(
                f"{s['distro']}: cases with problems (see --json): {', '.join(s['cases_not_passed'])}"
            )
    return "\n".join(lines + [""] + [f"* {n}" for n in notes])


def passed(s: dict[str, Any]) -> bool:
    must_be_zero = ("failed", "fuzz_findings", "secrets_leaked", "left_behind")
    return all(s[key] == 0 for key in must_be_zero) and not s["cases_not_passed"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/hostile.py", description=__doc__.split("\n")[0])
    parser.add_argument("--distro", action="append", choices=DISTROS, help="repeatable (default: all)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here, as JSON")
    parser.add_argument(
        "--from-json", type=Path, metavar="PATH", help="only print the table of an earlier --json"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        earlier = json.loads(args.from_json.read_text())
        summaries = [summarize(r) for r in earlier["results"]]
        print(f"jobrunner under hostile conditions ({earlier['date']}, {earlier.get('machine', '?')})")
        print(render(summaries))
        return 0 if all(passed(s) for s in summaries) else 1
    if os.geteuid() != 0:
        print("bench/hostile.py: must run as root (it boots containers): sudo python3 bench/hostile.py",
              file=sys.stderr)  # fmt: skip
        return 77
    results = [bench_distro(distro) for distro in args.distro or DISTROS]
    summaries = [summarize(r) for r in results]
    when = time.strftime("%Y-%m-%d", time.gmtime())
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}"
    print(f"jobrunner under hostile conditions ({when}, {machine})")
    print(render(summaries))
    for s in summaries:
        if s["systemd"] != str(EXPECTED_SYSTEMD.get(s["distro"], s["systemd"])):
            print(f"* {s['distro']}: systemd {s['systemd']}, expected {EXPECTED_SYSTEMD[s['distro']]}")
    if args.json:
        figures = {"date": when, "machine": machine, "summaries": summaries, "results": results}
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0 if all(passed(s) for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
