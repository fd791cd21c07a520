"""Jobs that call HTTP APIs never hold the key, under real systemd (252 and 257).

An HTTPS upstream with a CA of its own (tests/api_upstream.py) runs in the container, records the headers
it receives and echoes them back. The jobs run tests/e2e/project/bin/e2e-api, which calls its APIs
through $JOB_API_<NAME>_URL, or tries what it must not be able to do, and prints what happened; the
tests (which alone know the key) judge it.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from runner.redact import encoded_forms
from tests.api_upstream import make_ca, make_server_cert

from .conftest import Installation, exposure, jobs_toml, write_jobs
from .container import Container

pytestmark = pytest.mark.e2e

UPSTREAM = "/opt/e2e-upstream"
PORT = 8443
KEY_NAME = "e2e-llm-key"
ARGS = "[A-Za-z0-9_./?&=:%-]+"

API_JOBS = f"""
[apis.llm]
url = "https://127.0.0.1:{PORT}"
credential = "{KEY_NAME}"
ca = "{UPSTREAM}/test-ca.pem"

[apis.llm-down]
url = "https://127.0.0.1:9"
credential = "{KEY_NAME}"

[apis.llm-badca]
url = "https://127.0.0.1:{PORT}"
credential = "{KEY_NAME}"
ca = "{UPSTREAM}/other-ca.pem"

[apis.llm-slow]
url = "https://127.0.0.1:{PORT}"
credential = "{KEY_NAME}"
ca = "{UPSTREAM}/test-ca.pem"
timeout = 1

[apis.llm-unstored]
url = "https://127.0.0.1:{PORT}"
credential = "e2e-never-stored"
ca = "{UPSTREAM}/test-ca.pem"

[apis.x-key]
url = "https://127.0.0.1:{PORT}/echo"
credential = "{KEY_NAME}"
header = "X-Api-Key"
value = "{{credential}}"
ca = "{UPSTREAM}/test-ca.pem"

[jobs.e2e-api]
description = "Calls its APIs through their endpoints"
command = ["bin/e2e-api"]
args = "{ARGS}"
apis = ["llm", "llm-down", "llm-badca", "llm-slow", "llm-unstored", "x-key"]
concurrency = "parallel"
timeout = 120

[jobs.e2e-api-offline]
description = "Calls its API, with no network"
command = ["bin/e2e-api"]
args = "{ARGS}"
apis = ["llm"]
network = "none"

[jobs.e2e-api-operator]
description = "Calls its API once: for an operator's systemctl start"
command = ["bin/e2e-api", "get", "llm", "/echo?operator"]
apis = ["llm"]

[jobs.e2e-api-other]
description = "Lists no API"
command = ["bin/e2e-api"]
args = "{ARGS}"
concurrency = "parallel"
"""


class Apis:
    def __init__(self, inst: Installation, key: str) -> None:
        self.inst = inst
        self.ct: Container = inst.container
        self.key = key
        self.header = f"Bearer {key}"

    def run(self, job: str, *args: str, status: int = 0) -> dict[str, object]:
        res = self.inst.jobctl("run", job, "--", *args)
        assert res.returncode == status, (res.returncode, res.stdout, res.stderr)
        self.assert_no_key(res.stdout + res.stderr, f"the output of {job} {args}")
        result: dict[str, object] = json.loads(res.stdout.decode().strip().splitlines()[-1])
        return result

    def records(self) -> list[dict[str, object]]:
        text = self.ct.run(["cat", f"{UPSTREAM}/record.jsonl"]).stdout.decode()
        return [json.loads(line) for line in text.splitlines() if line]

    def secret_forms(self) -> list[bytes]:
        values = [self.key.encode(), self.header.encode()]
        return values + [form for value in values for form in encoded_forms(value)]

    def assert_no_key(self, data: bytes, where: str) -> None:
        for form in self.secret_forms():
            assert form not in data, f"the key ({form[:4]!r}...) is in {where}"

    def journal(self, *matches: str) -> list[dict[str, str]]:
        self.ct.run(["journalctl", "--sync"], check=False)
        out = self.ct.run(["journalctl", "-o", "json", "--no-pager", *matches]).stdout.decode()
        return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def apis(installed: Installation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apis]:
    ct = installed.container
    certs = tmp_path_factory.mktemp("certs")
    ca = make_ca(certs)
    make_server_cert(certs, ca)
    make_ca(certs, "other-ca")
    for name in ("test-ca.pem", "other-ca.pem", "server.pem", "server.key"):
        ct.write_file(f"{UPSTREAM}/{name}", (certs / name).read_bytes())
    ct.write_file(f"{UPSTREAM}/api_upstream.py", (Path(__file__).parents[1] / "api_upstream.py").read_bytes())
    ct.run(["systemctl", "stop", "e2e-upstream"], check=False)
    ct.run(["rm", "-f", f"{UPSTREAM}/ready", f"{UPSTREAM}/record.jsonl"])
    ct.run(["systemd-run", "--unit=e2e-upstream", "--collect", "-p", "Type=exec", "python3",
            f"{UPSTREAM}/api_upstream.py", "--port", str(PORT), "--cert", f"{UPSTREAM}/server.pem",
            "--key", f"{UPSTREAM}/server.key", "--record", f"{UPSTREAM}/record.jsonl",
            "--ready", f"{UPSTREAM}/ready"])  # fmt: skip
    ct.run(
        ["sh", "-c", f"for i in $(seq 300); do [ -e {UPSTREAM}/ready ] && exit 0; sleep 0.1; done; exit 1"]
    )
    key = "sk-e2e-" + secrets.token_hex(20)
    ct.run(["jobrunner", "creds", "set", KEY_NAME], input=key.encode())
    write_jobs(ct, jobs_toml() + API_JOBS)
    try:
        yield Apis(installed, key)
    finally:
        write_jobs(ct, jobs_toml())
        ct.run(["systemctl", "stop", "e2e-upstream"], check=False)
        ct.run(["rm", "-f", f"/etc/credstore.encrypted/{KEY_NAME}"])


def test_the_upstream_gets_the_key_and_the_job_never_does(apis: Apis) -> None:
    got = apis.run("e2e-api", "get", "llm", "/echo?q=1")

    assert got["status"] == 200
    echoed = json.loads(str(got["body"]))
    assert echoed["path"] == "/echo?q=1"
    assert echoed["headers"]["Authorization"] == "Bearer ***"  # the upstream echoed the key: redacted
    last = apis.records()[-1]
    assert last["path"] == "/echo?q=1"
    assert ["Authorization", apis.header] in last["headers"]


def test_the_jobs_own_header_of_that_name_is_replaced(apis: Apis) -> None:
    before = len(apis.records())
    request = "GET /echo HTTP/1.1\r\nHost: x\r\nX-Api-Key: the-jobs-own\r\nConnection: close\r\n\r\n"
    got = apis.run("e2e-api", "raw", "x-key", request.encode().hex())

    assert got["response"].startswith("HTTP/1.1 200")
    sent = apis.records()[before:]
    assert len(sent) == 1
    assert sent[0]["path"] == "/echo/echo"  # url's path, then the request's
    assert [v for k, v in sent[0]["headers"] if k.lower() == "x-api-key"] == [apis.key]


def test_an_echo_of_the_key_in_any_encoding_is_redacted(apis: Apis) -> None:
    got = apis.run("e2e-api", "get", "llm", "/echo-key")

    assert got["status"] == 200
    lines = str(got["body"]).splitlines()
    assert len(lines) == 5  # raw, key alone, base64, hex, URL-encoded: each one redacted
    assert all("***" in line for line in lines), lines
    assert ["X-Echo-Key", "Bearer ***"] in got["headers"]


def test_run_log_and_journal_record_each_request_and_never_the_key(apis: Apis) -> None:
    got = apis.run("e2e-api", "get", "llm", "/echo?token=secret-query")
    run_id = str(got["run"])

    log = apis.ct.run(["sh", "-c", f"cat {apis.inst.logs}/e2e-api/{run_id}.log"]).stdout
    assert re.search(rb"^# api llm: GET /echo -> 200, \d+ bytes, [\d.]+ ms$", log, re.MULTILINE), log
    api_lines = [line for line in log.splitlines() if line.startswith(b"# api ")]
    assert len(api_lines) == 1
    assert b"secret-query" not in api_lines[0]  # no query string: it may hold other secrets
    entries = apis.journal(f"JOB_RUN_ID={run_id}", "API_NAME=llm")
    assert [(e["HTTP_METHOD"], e["HTTP_PATH"], e["HTTP_STATUS"]) for e in entries] == [
        ("GET", "/echo", "200")
    ]
    assert entries[0]["_SYSTEMD_UNIT"].startswith("jobrunner-api-llm@")
    assert entries[0]["JOB_NAME"] == "e2e-api"
    # Everything the journal and the logs hold, after all the requests of this module so far.
    journal = apis.ct.run(["journalctl", "-o", "export", "--no-pager"]).stdout
    apis.assert_no_key(journal, "the journal")
    logs = apis.ct.run(["sh", "-c", f"cat {apis.inst.logs}/*/*.log"]).stdout
    apis.assert_no_key(logs, "the run logs")


def test_a_job_that_looks_everywhere_finds_no_key(apis: Apis) -> None:
    seen = apis.run("e2e-api", "look", "llm")

    dump = apis.ct.run(["sh", "-c", f"cat {apis.inst.outputs}/e2e-api/{seen['run']}/dump.bin"]).stdout
    # The dump is real: its own environment and the memory of at least itself and its runner.
    assert b"JOB_API_LLM_URL" in dump
    assert sum(1 for path in seen["read"] if str(path).endswith("/mem")) >= 2, seen  # type: ignore[union-attr]
    apis.assert_no_key(dump, "what the job could read")
    # The API's socket is out of its reach by path; only its unit's private copy exists.
    assert seen["/run/jobrunner-api/llm.sock"] == "EACCES"
    assert seen["/run/jobrunner-api listing"] == "EACCES"
    # The proxy serving its open connection (another user) is not even visible: ProtectProc=invisible.
    commands = seen["commands"]
    assert isinstance(commands, list)
    assert any("e2e-api look" in command for command in commands)  # itself, for comparison
    assert not any("apiproxy" in command for command in commands), commands


def test_the_jobs_units_load_no_credential_used_through_apis(apis: Apis) -> None:
    for unit in ("job-e2e-api@.service", "job@e2e-api.service", "job-e2e-api-offline@.service"):
        text = apis.ct.run(["systemctl", "cat", unit]).stdout.decode()
        assert KEY_NAME not in text, unit
        assert "BindReadOnlyPaths=/run/jobrunner-api/llm.sock" in text
    proxy = apis.ct.run(["systemctl", "cat", "jobrunner-api-llm@.service"]).stdout.decode()
    assert f"LoadCredentialEncrypted={KEY_NAME}:" in proxy
    listed = apis.ct.run(["systemctl", "list-units", "--all", "--plain", "--no-legend", "*llm*"]).stdout
    assert b"jobrunner-api-llm.socket" in listed


def test_a_job_without_network_reaches_the_api_only_through_its_endpoint(apis: Apis) -> None:
    got = apis.run("e2e-api-offline", "get", "llm", "/echo")
    assert got["status"] == 200
    assert json.loads(str(got["body"]))["headers"]["Authorization"] == "Bearer ***"

    assert apis.run("e2e-api-offline", "direct", f"127.0.0.1:{PORT}")["direct"] != "ok"
    # ...which the same job with the host's network does reach: the refusal above is the sandbox's.
    assert apis.run("e2e-api", "direct", f"127.0.0.1:{PORT}")["direct"] == "ok"


@pytest.mark.parametrize("path", ["/stream?n=4&delay=0.5", "/sse?n=4&delay=0.5"])
def test_a_streamed_answer_arrives_in_pieces_as_sent(apis: Apis, path: str) -> None:
    got = apis.run("e2e-api", "stream", "llm", path)

    assert got["status"] == 200
    pieces = got["pieces"]
    assert isinstance(pieces, list)
    text = "".join(piece["data"] for piece in pieces)
    assert text.count("chunk" if "stream" in path else "data:") >= 4
    # The upstream pauses 0.5 s between pieces: a proxy that buffered would deliver them at once.
    gaps = [b["at"] - a["at"] for a, b in pairwise(pieces)]
    assert sum(1 for gap in gaps if gap >= 0.25) >= 3, gaps
    if "sse" in path:
        assert got["headers"]["Content-Type"] == "text/event-stream"


def test_many_requests_on_one_kept_alive_connection_use_one_proxy(apis: Apis) -> None:
    got = apis.run("e2e-api", "keepalive", "llm", "20")

    assert got["statuses"] == [200] * 20
    assert got["connections"] == 1
    entries = apis.journal(f"JOB_RUN_ID={got['run']}", "API_NAME=llm")
    assert len(entries) == 20
    assert len({e["_PID"] for e in entries}) == 1  # one proxy process served them all


def test_concurrent_connections_each_get_a_proxy(apis: Apis) -> None:
    got = apis.run("e2e-api", "concurrent", "llm", "8")

    assert got["statuses"] == [200] * 8
    entries = apis.journal(f"JOB_RUN_ID={got['run']}", "API_NAME=llm")
    assert len({e["_PID"] for e in entries}) == 8


def test_a_run_that_opens_too_many_connections_is_limited_not_failed(apis: Apis) -> None:
    before = len(apis.records())
    got = apis.run("e2e-api", "concurrent", "llm", "40", "4")

    assert got["statuses"] == [200] * 40  # the connections beyond the limit waited, then were served
    starts = sorted(float(r["at"]) for r in apis.records()[before:] if str(r["path"]).startswith("/slow"))
    assert len(starts) == 40
    # Each request took 4 s upstream: at most 32 (runner/endpoint.py's MAX_CONNECTIONS) at once.
    most = max(sum(1 for t in starts if start <= t < start + 4) for start in starts)
    assert most <= 32, most


@pytest.mark.parametrize(
    ("api", "path", "status", "reason"),
    [
        ("llm-down", "/echo", 502, "cannot reach 127.0.0.1:9"),
        ("llm-badca", "/echo", 502, "certificate of 127.0.0.1:8443 is not valid"),
        ("llm-slow", "/slow?delay=5", 504, "did not answer within 1 s"),
        ("llm-unstored", "/echo", 502, "jobrunner creds set e2e-never-stored"),
    ],
)
def test_upstream_failures_get_a_plain_text_answer_and_the_run_goes_on(
    apis: Apis, api: str, path: str, status: int, reason: str
) -> None:
    got = apis.run("e2e-api", "get", api, path)  # exit status 0: the job itself went on

    assert got["status"] == status
    assert reason in str(got["body"])
    assert ["Content-Type", "text/plain; charset=utf-8"] in got["headers"]


def test_malformed_and_oversized_requests(apis: Apis) -> None:
    bad = apis.run("e2e-api", "raw", "llm", b"NOT HTTP AT ALL\r\n\r\n".hex())
    assert bad["response"].startswith("HTTP/1.1 400 "), bad

    big = apis.run("e2e-api", "raw", "llm", "00", "70000")  # a request head of 70 kB
    assert big["response"].startswith("HTTP/1.1 431 "), big["response"][:200]


def test_a_chunked_upload_reaches_the_upstream_whole(apis: Apis) -> None:
    got = apis.run("e2e-api", "upload", "llm")
    assert got["status"] == 200
    assert got["echo"]["body"] == "first,second,third"


def test_developers_and_other_jobs_cannot_use_a_runs_endpoint(apis: Apis) -> None:
    ct = apis.ct
    before = len(apis.records())
    ct.run(["sh", "-c", "jobctl run e2e-api -- hold llm 30 > /tmp/e2e-hold.out 2>&1 &"], user="alice")
    url, run_id = _wait_for_url(ct, "/tmp/e2e-hold.out")
    address = url.removeprefix("http://")
    try:
        # Another job, on the same host network: refused by the runner (not the job's own user).
        other = apis.run("e2e-api-other", "reach", address, "/echo")
        assert other["status"] == 403
        # A developer on the host: refused too.
        curl = ct.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{url}/echo"], user="alice")
        assert curl.stdout == b"403"
        # The API's socket itself: out of reach for everyone but root.
        for user in ("alice", "mallory"):
            probe = ct.run(["python3", "-c", "import socket; socket.socket(socket.AF_UNIX)"
                            ".connect('/run/jobrunner-api/llm.sock')"], user=user, check=False)  # fmt: skip
            assert b"PermissionError" in probe.stderr, probe.stderr
        # The run's log says so (the runner's records: not the job's output).
        log = ct.run(["cat", f"{apis.inst.logs}/e2e-api/{run_id}.log"]).stdout.decode()
        refused = re.findall(r"^# api llm: refused a connection from uid (\d+) \(403\)$", log, re.MULTILINE)
        alice = ct.run(["id", "-u", "alice"]).stdout.decode().strip()
        assert len(refused) == 2 and alice in refused, log
    finally:
        ct.run(["sh", "-c", "pkill -f '[j]obctl run e2e-api -- hold' || true"])
    assert len(apis.records()) == before  # not one request reached the upstream


def _wait_for_url(ct: Container, path: str) -> tuple[str, str]:
    for _ in range(600):
        out = ct.run(["cat", path], check=False).stdout.decode()
        match = re.search(r'"url": "(http://[0-9.:]+)", "run": "([^"]+)"', out)
        if match:
            return match.group(1), match.group(2)
        time.sleep(0.1)
    raise AssertionError(f"the holding run printed no URL: {out!r}")


def test_an_operators_start_gets_the_same_endpoints(apis: Apis) -> None:
    ct = apis.ct
    ct.run(["systemctl", "start", "job@e2e-api-operator"])  # Type=oneshot: returns when the run is done

    # (By the job's name, not after a cursor: journalctl 252 finds nothing with --after-cursor and a match.)
    entries = apis.journal("JOB_NAME=e2e-api-operator", "API_NAME=llm")
    assert [(e["HTTP_PATH"], e["HTTP_STATUS"]) for e in entries] == [("/echo", "200")]
    output = ct.run(["journalctl", "-u", "job@e2e-api-operator", "-o", "cat", "--no-pager"]).stdout
    assert b'\\"Authorization\\": \\"Bearer ***\\"' in output  # the upstream's echo, in the job's JSON
    apis.assert_no_key(output, "the operator's run in the journal")


def test_the_api_units_verify_and_keep_their_sandbox(apis: Apis) -> None:
    ct = apis.ct

    generated = ["jobrunner-api-llm.socket", "jobrunner-api-llm@x.service", "job-e2e-api-offline@x.service"]
    verified = ct.run(["sh", "-c", 'cd /run/systemd/generator && systemd-analyze verify "$@"', "sh", *generated],
                      check=False)  # fmt: skip
    assert (verified.returncode, verified.stdout, verified.stderr) == (0, b"", b""), verified
    # The proxy: as a job with the network (1.2; ProtectProc= is off so that it can read its peer's
    # cgroup). A job without network but with APIs: AF_INET on its own loopback costs it 0.4.
    assert exposure(ct, "jobrunner-api-llm@x.service") <= 1.2
    assert exposure(ct, "job-e2e-api-offline@x.service") <= 0.8
