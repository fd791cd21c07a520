"""Benchmark of a job's API endpoint against calling the upstream directly, under real systemd (issue 13).

    sudo python3 bench/api.py --distro bookworm --distro trixie --json bench/results.json
         [--requests 300] [--new 30] [--bytes 100000000] [--rounds 3] [--floor-requests 40]
         [--runner DIR] [--shell] [--from-json FILE]

About 50 s a distro. Boots the e2e container and installs jobrunner the way bench/run.py does (its
`install`, with its jobs and credential), then adds:
  - tests/api_upstream.py over HTTPS on 127.0.0.1:8443 (a transient unit), with a server certificate
    from a CA made on the host for this run (in /opt/upstream), and a twin on 8444 whose /bytes answers
    text (JSON lines of made-up words) instead of b"x" * N: the proxy searches every byte for the key,
    and how fast depends on the bytes;
  - [apis.bench] and [apis.bench-text] (those urls, that CA, one key stored with `jobrunner creds set
    bench-key`) and [jobs.bench-api], which lists both, has network = "any" (it reaches the upstreams
    directly too), timeout = 600, and runs bench/api_client.py (copied to /opt/bench).
The developer runs that job once (`jobctl run bench-api`); inside it, api_client.py measures both paths
in the same process, each the other's baseline: direct (https to the upstream, trusting the CA) and
through the endpoint (plain http to $JOB_API_BENCH_URL: a proxy unit per connection, which adds the key
and forwards over TLS). Its passes: kept-alive GET /echo (p50 / p90, the added p50: target +2 ms), GET
/echo on a new connection each, and a 100 MB answer (MB/s, endpoint / direct: target 0.5).

A new connection through the endpoint starts a sandboxed unit, so its added cost is set against the
floor of bench/run.py, measured in the same container with bench/run.py's own units and client (its
`floor_units`, bench/client.py's latency mode, as the developer): the no-op job's unit with a shell that
reads a line and replies. Beside it, the API floor: the same socket, but the proxy's own unit
(`systemctl cat jobrunner-api-bench@x.service`: its sandbox, DynamicUser, the API's key) with that shell.

Prints one table and, with --json, sets each distro's "api" key in that file (bench/run.py's document,
{"distros": {DISTRO: {...}}}), leaving the rest of it as it was: the raw times, the table's figures,
the host's load average before and after (the machine's other work moves these figures), and the commit
with the installed files that differ from it (install copies the working tree). --runner installs
another runner/ directory (A/B runs, as bench/run.py's --runner); --shell sets up and keeps the
container up; --from-json prints the table of an earlier file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))


def _load_run() -> ModuleType:
    """bench/run.py, whose install, floor units and client this bench reuses (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_run", HERE / "run.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {HERE / 'run.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load_run()
from tests.api_upstream import make_ca, make_server_cert  # noqa: E402 - after run.py has set sys.path
from tests.e2e.conftest import DEVELOPER  # noqa: E402
from tests.e2e.container import DISTROS, Container  # noqa: E402

API = "bench"
API_CREDENTIAL = "bench-key"
UPSTREAM_DIR = "/opt/upstream"
# Two instances of tests/api_upstream.py: its own /bytes answers b"x" * N; the second one's answers text
# (TEXT_UPSTREAM replaces its 1 MiB block), behind a second API with the same key.
UPSTREAMS = {  # API name -> port
    API: 8443,
    f"{API}-text": 8444,
}
CA = f"{UPSTREAM_DIR}/test-ca.pem"
CLIENT = "/opt/bench/api_client.py"  # readable by the job's own user (ProtectHome= hides /home)
RESULT_PREFIX = "api-bench-result "  # api_client.py's result line
# The proxy's own sandbox and key, with bench/run.py's floor shell in place of the proxy.
API_FLOOR = run.socket_target("api-floor", "/run/api-floor.sock", "x\n", "floor-ok")
MIB = 1 << 20
TEXT_UPSTREAM = f"""\
import sys

sys.path.insert(0, "{UPSTREAM_DIR}")
import api_upstream

with open("{UPSTREAM_DIR}/text-block", "rb") as f:
    api_upstream.BLOCK = f.read()
sys.exit(api_upstream.main())
"""


def url(api: str) -> str:
    return f"https://127.0.0.1:{UPSTREAMS[api]}"  # not "localhost": the container has no such entry


def text_block() -> bytes:
    """1 MiB of JSON lines of made-up words: what an API's answer looks like, and no key in it."""
    rnd = random.Random(1)  # noqa: S311 - a payload, not a secret
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rnd.choices(letters, k=rnd.randint(2, 10))) for _ in range(2000)]
    lines, size, i = [], 0, 0
    while size < MIB:
        line = json.dumps({"index": i, "text": " ".join(rnd.choices(words, k=16))}).encode() + b"\n"
        lines.append(line)
        size += len(line)
        i += 1
    return b"".join(lines)[:MIB]


def log(msg: str) -> None:
    print(f"[bench-api] {msg}", file=sys.stderr, flush=True)


def jobs_toml(args: argparse.Namespace) -> str:
    """bench/run.py's jobs (the floor is made from its no-op job's unit), the APIs and the bench job."""
    text_api = f"{API}-text"
    client = [
        "/usr/bin/python3", CLIENT, "--direct", url(API), "--ca", CA, "--api", API,
        "--text-direct", url(text_api), "--text-api", text_api,
        "--requests", str(args.requests), "--new", str(args.new),
        "--bytes", str(args.bytes), "--rounds", str(args.rounds),
    ]  # fmt: skip
    apis = "".join(
        f'\n[apis.{api}]\nurl = "{url(api)}"\ncredential = "{API_CREDENTIAL}"\nca = "{CA}"\n'
        for api in UPSTREAMS
    )
    return (
        run.JOBS_TOML
        + apis
        + f"""
[jobs.bench-api]
description = "Calls the upstream directly and through its endpoint (bench/api.py)"
command = {json.dumps(client)}
apis = {json.dumps(list(UPSTREAMS))}
network = "any"  # so that it reaches the upstreams directly too
concurrency = "parallel"
timeout = 600
"""
    )


# ----------------------------------------------------------------------------------------------- setup


def start_upstreams(ct: Container) -> None:
    """tests/api_upstream.py on 127.0.0.1:8443 (and its text twin on 8444), with a certificate of a CA
    made here for this run."""
    with tempfile.TemporaryDirectory(prefix="jobrunner-bench-api-") as tmp:
        ca = make_ca(Path(tmp))
        cert, key = make_server_cert(Path(tmp), ca, ips=("127.0.0.1",))
        for path, mode in ((ca[0], 0o644), (cert, 0o644), (key, 0o600)):  # not the CA's key
            ct.write_file(f"{UPSTREAM_DIR}/{path.name}", path.read_bytes(), mode=mode)
    ct.write_file(f"{UPSTREAM_DIR}/api_upstream.py", (REPO / "tests" / "api_upstream.py").read_bytes())
    ct.write_file(f"{UPSTREAM_DIR}/text_upstream.py", TEXT_UPSTREAM)
    ct.write_file(f"{UPSTREAM_DIR}/text-block", text_block())
    for api, port in UPSTREAMS.items():
        script = "text_upstream.py" if api.endswith("-text") else "api_upstream.py"
        ready = f"/run/upstream-{api}.port"
        ct.run(
            [
                "systemd-run", "--quiet", f"--unit=upstream-{api}", "-p", "Type=exec", "--",
                "python3", f"{UPSTREAM_DIR}/{script}", "--bind", "127.0.0.1", "--port", str(port),
                "--cert", f"{UPSTREAM_DIR}/{cert.name}", "--key", f"{UPSTREAM_DIR}/{key.name}",
                "--ready", ready,
            ]
        )  # fmt: skip
        for _ in range(200):
            if ct.run(["test", "-s", ready], check=False).returncode == 0:
                break
            time.sleep(0.05)
        else:
            status = ct.run(["systemctl", "status", "--no-pager", f"upstream-{api}"], check=False)
            raise RuntimeError(f"the upstream did not start:\n{status.stdout.decode()}")


def api_floor_unit(ct: Container) -> None:
    """api-floor.socket (job.socket's text, as bench/run.py's floors) + api-floor@.service: the proxy's
    unit with the floor's shell as ExecStart."""
    socket_text = run.unit_text(ct, "job.socket").replace(
        "ListenStream=/run/job.sock", "ListenStream=/run/api-floor.sock"
    )
    service = run.unit_text(ct, f"jobrunner-api-{API}@x.service")
    lines = [line for line in service.splitlines() if not line.startswith("ExecStart=")]
    reply = f"ExecStart=/bin/sh -c '{run.FLOOR_REPLY}'"
    ct.write_file("/etc/systemd/system/api-floor.socket", socket_text)
    ct.write_file("/etc/systemd/system/api-floor@.service", "\n".join([*lines, "", "[Service]", reply, ""]))
    ct.run(["systemctl", "daemon-reload"])
    ct.run(["systemctl", "start", "api-floor.socket"])


def setup(ct: Container, args: argparse.Namespace) -> None:
    run.install(ct, args.runner)  # users, install.sh, bench/run.py's jobs, its credential
    start_upstreams(ct)
    run.store_credential(ct, API_CREDENTIAL, "bench-api-" + secrets.token_hex(16))
    ct.write_file(CLIENT, (HERE / "api_client.py").read_bytes())
    ct.write_file("/etc/jobrunner/jobs.toml", jobs_toml(args))
    ct.run(["jobrunner", "check"])  # applies it now (jobrunner-config.path would, a moment later)
    run.floor_units(ct)
    api_floor_unit(ct)
    ct.write_file(run.CLIENT_AS_DEVELOPER, (HERE / "client.py").read_bytes())


# ------------------------------------------------------------------------------------------- measuring


def measure(ct: Container, args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "systemd": run._systemd_version(ct),
        "python": run._python_version(ct),
        "runner": str(args.runner) if args.runner else "checkout",
        "bytes_per_answer": args.bytes,
        # The host's (the kernel's) load average: other work on the machine moves every figure here.
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    targets = [run.FLOOR, API_FLOOR]
    log(f"floors: {args.floor_requests} rounds over floor, api-floor (as {DEVELOPER})")
    spec = {"targets": targets, "requests": args.floor_requests, "warmup": 5, "pause_s": 0.03, "seed": 1}
    raw["floor"] = run.client(ct, "latency", spec, user=DEVELOPER, timeout=600)
    log("jobctl run bench-api")
    started = time.monotonic()
    res = ct.run(["jobctl", "run", "bench-api"], user=DEVELOPER, check=False, timeout=900)
    log(f"the job took {time.monotonic() - started:.1f} s, exit status {res.returncode}")
    for line in res.stderr.decode(errors="replace").splitlines():
        if line.startswith("[api_client]"):
            log(f"  {line}")
    out = res.stdout.decode(errors="replace")
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if res.returncode != 0 or not lines:
        err = res.stderr.decode(errors="replace")
        raise RuntimeError(f"bench-api exited with {res.returncode}:\n{out[-3000:]}\n{err[-3000:]}")
    raw["client"] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    raw["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    raw["proxy_units"] = _proxy_starts(ct)
    raw["figures"] = figures(raw)
    return raw


def _proxy_starts(ct: Container) -> int:
    """How many proxy units the run started (one per connection the job opened to its endpoint)."""
    out = ct.run(
        ["journalctl", "--no-pager", "-o", "cat", "-u", f"jobrunner-api-{API}@*"], check=False
    ).stdout.decode()
    return sum(1 for line in out.splitlines() if line.startswith("Started "))


# ------------------------------------------------------------------------------------------- the table


def _ms(values: list[float]) -> list[float]:
    return [v * 1000 for v in values]


def figures(raw: dict[str, Any]) -> dict[str, Any]:
    """The figures the table shows, from the raw numbers (also kept in results.json, for reading).
    A pass that failed, or a path with no answered request, has no figures."""
    pct = run.pct
    client = raw["client"]
    out: dict[str, Any] = {}
    floor, api_floor = _ms(raw["floor"]["floor"]["total"]), _ms(raw["floor"]["api-floor"]["total"])
    out["floor_p50_ms"], out["api_floor_p50_ms"] = pct(floor, 0.5), pct(api_floor, 0.5)
    for kind in ("keepalive", "new"):
        for path in ("direct", "endpoint"):
            values = _ms(client.get(kind, {}).get(path, []))
            if values:
                out[f"{kind}_{path}_p50_ms"] = pct(values, 0.5)
                out[f"{kind}_{path}_p90_ms"] = pct(values, 0.9)
        if f"{kind}_endpoint_p50_ms" in out and f"{kind}_direct_p50_ms" in out:
            out[f"{kind}_added_p50_ms"] = out[f"{kind}_endpoint_p50_ms"] - out[f"{kind}_direct_p50_ms"]
    if "new_added_p50_ms" in out:
        out["new_added_over_floor"] = out["new_added_p50_ms"] / out["floor_p50_ms"]
        out["new_added_over_api_floor"] = out["new_added_p50_ms"] / out["api_floor_p50_ms"]
    for kind in ("bytes", "bytes-text"):
        key = kind.replace("-", "_")
        for path in ("direct", "endpoint"):
            answers = client.get(kind, {}).get(path, [])
            if answers:
                out[f"{key}_{path}_mb_s"] = statistics.median(
                    r["bytes"] / r["seconds"] / 1e6 for r in answers
                )
        if f"{key}_endpoint_mb_s" in out and f"{key}_direct_mb_s" in out:
            out[f"{key}_ratio"] = out[f"{key}_endpoint_mb_s"] / out[f"{key}_direct_mb_s"]
    return out


Row = tuple[str, str, str, str, str]  # measure, baseline, value, vs baseline, target


def rows(api: dict[str, Any]) -> list[Row]:
    f = api["figures"]
    client = api["client"]
    errors = client.get("errors", {})

    def failed(kind: str, path: str) -> str:
        entry = errors.get(kind, {}).get(path) or errors.get(kind, {}).get("pass")
        if not entry:
            return ""
        answered = len(client.get(kind, {}).get(path, []))
        return f"{entry['count']} failed, {answered} answered: {entry['first'][0][:60]}"

    def lat(kind: str, path: str) -> str:
        if f"{kind}_{path}_p50_ms" not in f:
            return "FAILED"
        flag = " (noisy)" if run.noisy(_ms(client[kind][path])) else ""
        return f"{f[f'{kind}_{path}_p50_ms']:7.2f} / {f[f'{kind}_{path}_p90_ms']:7.2f} ms{flag}"

    def num(key: str, fmt: str, suffix: str = "") -> str:
        return format(f[key], fmt) + suffix if key in f else "-"

    def target(key: str, ok: Callable[[float], bool], text: str) -> str:
        return f"{text} {run._verdict(key in f and ok(f[key]))}"

    out: list[Row] = []
    for kind, label in (("keepalive", "kept-alive GET /echo"), ("new", "GET /echo, new connection")):
        out.append((f"{label}, direct https", "itself", lat(kind, "direct"), "", failed(kind, "direct")))
        goal = target("keepalive_added_p50_ms", lambda v: v <= 2, "<= +2 ms") if kind == "keepalive" else ""
        problem = failed(kind, "endpoint")
        out.append(
            (
                f"{label}, through the endpoint",
                "direct",
                lat(kind, "endpoint"),
                num(f"{kind}_added_p50_ms", "+.2f" if kind == "keepalive" else "+.1f", " ms"),
                f"{goal}; {problem}" if goal and problem else goal or problem,
            )
        )
    out += [
        ("floor: the job's sandbox + key, sh reply", "itself", num("floor_p50_ms", "7.1f", " ms"), "", ""),
        (
            "API floor: the proxy's sandbox + key, sh reply",
            "floor",
            num("api_floor_p50_ms", "7.1f", " ms"),
            f"{f['api_floor_p50_ms'] / f['floor_p50_ms']:.2f} x",
            "",
        ),
        (
            "new connection's added p50 / floor",
            "floor",
            num("new_added_p50_ms", "+7.1f", " ms"),
            num("new_added_over_floor", ".2f", " x"),
            "",
        ),
    ]
    size = api.get("bytes_per_answer", 0) / 1e6
    for kind, what in (("bytes", 'b"x" * N'), ("bytes-text", "text")):
        key = kind.replace("-", "_")
        problem = failed(kind, "pass")
        goal = target(f"{key}_ratio", lambda v: v >= 0.5, ">= 0.5") if kind == "bytes" else ""
        out += [
            (
                f"{size:g} MB answer ({what}), direct https",
                "itself",
                num(f"{key}_direct_mb_s", "7.0f", " MB/s"),
                "",
                "",
            ),
            (
                f"{size:g} MB answer ({what}), through the endpoint",
                "direct",
                num(f"{key}_endpoint_mb_s", "7.0f", " MB/s"),
                num(f"{key}_ratio", ".2f"),
                f"{goal}; {problem}" if goal and problem else goal or problem,
            ),
        ]
    return out


def print_table(per_distro: dict[str, dict[str, Any]]) -> None:
    tables = {distro: rows(api) for distro, api in per_distro.items()}
    first = next(iter(tables.values()))
    header = ["measure", "baseline"]
    for distro, api in per_distro.items():
        header += [f"{distro} ({api['systemd'].split()[1]})", "vs baseline", "target"]
    body = []
    for i, row in enumerate(first):
        line = [row[0], row[1]]
        for table in tables.values():
            line += [table[i][2], table[i][3], table[i][4]]
        body.append(line)
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    fmt = " | ".join(f"{{:{w}}}" for w in widths)
    print(fmt.format(*header))
    print("-|-".join("-" * w for w in widths))
    for line in body:
        print(fmt.format(*line))
    loads = ", ".join(
        f"{d}: {api.get('loadavg_before', ['?'])[0]} -> {api.get('loadavg_after', ['?'])[0]}"
        for d, api in per_distro.items()
    )
    print(f"\nhost load average (1 min) before -> after: {loads}")
    for distro, api in per_distro.items():
        code = api.get("code", {})
        changed = ", ".join(code.get("uncommitted", [])) or "none"
        runner = api.get("runner", "checkout")
        print(f"{distro}: code {code.get('commit', '?')}, uncommitted: {changed}; runner/: {runner}")
    print("latencies: p50 / p90; 'vs baseline': the p50's difference or the ratio; same run, same process.")


# ------------------------------------------------------------------------------------------------ main


def bench(distro: str, args: argparse.Namespace) -> dict[str, Any]:
    with Container.boot(distro, name="bench-api", binds_ro={REPO: "/src"}) as ct:
        log(f"{distro}: installing jobrunner, the upstream and the API")
        code = code_state()  # what install copies: the working tree, which may differ from HEAD
        setup(ct, args)
        if args.shell:
            print(f"container up: {ct.nsenter_hint()}\nCtrl-C to power it off", flush=True)
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
            return {}
        return {"code": code, **measure(ct, args)}


def code_state() -> dict[str, Any]:
    """The commit, and the files of the installed code that differ from it (install copies the tree)."""

    def git(*argv: str) -> str:
        argv = ("git", "-C", str(REPO), *argv)
        return subprocess.run(argv, check=False, capture_output=True, text=True).stdout.rstrip()

    changed = git("status", "--porcelain", "--", "runner", "units", "install.sh").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": [line[3:] for line in changed]}


def save(path: Path, results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    """Each distro's "api" key in bench/run.py's document; the rest of the file stays as it was."""
    document: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"distros": {}}
    for distro, api in results.items():
        document.setdefault("distros", {}).setdefault(distro, {})["api"] = {**meta, **api}
    path.write_text(json.dumps(document, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--distro", action="append", choices=DISTROS, help="repeat for both (default: bookworm)"
    )
    parser.add_argument("--requests", type=int, default=300, help="kept-alive requests per path (300)")
    parser.add_argument("--new", type=int, default=30, help="requests on a new connection per path (30)")
    parser.add_argument("--bytes", type=int, default=100_000_000, help="the large answer's size (100 MB)")
    parser.add_argument("--rounds", type=int, default=3, help="large answers per path (3)")
    parser.add_argument("--floor-requests", type=int, default=40, help="floor round trips (40)")
    parser.add_argument("--json", type=Path, help="set each distro's 'api' key in this file")
    parser.add_argument("--runner", type=Path, help="install this runner/ directory instead (A/B runs)")
    parser.add_argument("--shell", action="store_true", help="set up, then keep the container up")
    parser.add_argument("--from-json", type=Path, help="only print the table of an earlier --json file")
    args = parser.parse_args(argv)
    if args.from_json:
        distros = json.loads(args.from_json.read_text())["distros"]
        print_table({d: raw["api"] for d, raw in distros.items() if "api" in raw})
        return 0
    if os.geteuid() != 0:
        parser.error("must run as root (it boots a container)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    meta = {
        "command": shlex.join(["bench/api.py", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "kernel": os.uname().release},
    }
    results = {distro: bench(distro, args) for distro in args.distro or ["bookworm"]}
    if args.shell:
        return 0
    if args.json:
        save(args.json, results, meta)
        log(f"figures in {args.json}")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
