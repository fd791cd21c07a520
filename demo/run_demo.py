#!/usr/bin/env python3
"""The demo (`make demo`): jobrunner end to end on a machine that does not run systemd.

It boots a throwaway Debian container with real systemd (debootstrap + systemd-nspawn, see
tests/e2e/container.py), installs jobrunner with install.sh exactly as an administrator would,
stores a random demo key with `jobrunner creds set`, then, as the developer alice:
  - runs the example job with jobctl and with socat, and looks at its outputs;
  - fails to read the key (the encrypted store, the credential directory) and fails to run the
    app or the runner directly.
Each step prints the command and what it printed. Exits non-zero if anything behaves otherwise,
or if the key ever shows up in what a developer saw.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.container import Container, build_rootfs  # noqa: E402

PROJECT = "/home/alice/demo-project"
BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


class Demo:
    def __init__(self, container: Container, secret: str) -> None:
        self.container = container
        self.secret = secret
        self.seen_by_developer = b""

    def step(self, title: str) -> None:
        print(f"\n{BOLD}== {title}{RESET}", flush=True)

    def sh(
        self, command: str, *, user: str | None = None, expect: int | None = 0, stdin: bytes | None = None
    ) -> bytes:
        prompt = f"{user}$" if user else "root#"
        print(f"{DIM}{prompt}{RESET} {command}", flush=True)
        result = self.container.run(["sh", "-c", command], user=user, input=stdin, check=False, timeout=120)
        output = result.stdout + result.stderr
        sys.stdout.write(output.decode(errors="replace"))
        if user:
            self.seen_by_developer += output
        if expect is not None and result.returncode != expect:
            raise SystemExit(f"demo: expected exit status {expect}, got {result.returncode}: {command}")
        if expect is None and result.returncode == 0:
            raise SystemExit(f"demo: expected this to fail, it succeeded: {command}")
        if user:
            print(f"{DIM}(exit status {result.returncode}){RESET}")
        return output


def run(distro: str) -> None:
    build_rootfs(distro)
    secret = "demo-" + os.urandom(16).hex()  # random: the demo never prints it, and checks that
    with Container.boot(distro, name="jrdemo", binds_ro={str(REPO): "/src"}) as container:
        demo = Demo(container, secret)
        demo.step(
            f"A fresh Debian ({distro}) with systemd as PID 1; two users, alice (a developer) and mallory"
        )
        demo.sh("systemctl --version | head -1; useradd -m alice; useradd -m mallory")
        demo.sh(f"cp -a /src/examples/demo-project {PROJECT} && chown -R alice: {PROJECT}")

        demo.step("The administrator installs jobrunner for alice's project, adds alice, stores the key")
        demo.sh("cp -a /src /root/jobrunner")
        demo.sh(f"/root/jobrunner/install.sh --project {PROJECT} | tail -n 12")
        demo.sh("usermod -aG jobrunner alice")
        demo.sh("jobrunner creds set api-key", stdin=secret.encode() + b"\n")
        demo.sh("systemctl status --no-pager job.socket | head -n 4")

        demo.step("alice runs the job: it uses the key, and she sees its output live")
        demo.sh("jobctl list", user="alice")
        demo.sh("jobctl run hello -- Ada", user="alice")
        demo.sh("printf 'run hello Grace\\n' | socat -t 60 - UNIX-CONNECT:/run/job.sock", user="alice")
        demo.sh(
            f"ls -l {PROJECT}/outputs/hello/latest/ && cat {PROJECT}/outputs/hello/latest/report.txt",
            user="alice",
        )
        demo.sh(
            f"tail -n 4 {PROJECT}/logs/hello/$(readlink {PROJECT}/outputs/hello/latest).log", user="alice"
        )

        demo.step("alice cannot read the key")
        demo.sh("cat /etc/credstore.encrypted/api-key", user="alice", expect=None)
        demo.sh("cat /var/lib/systemd/credential.secret", user="alice", expect=None)
        demo.sh(f"cd {PROJECT} && bin/hello", user="alice", expect=None)
        demo.sh("PYTHONPATH=/usr/local/lib/jobrunner python3 -m runner hello", user="alice", expect=78)

        demo.step("mallory, not in the group, cannot even connect")
        demo.sh("jobctl run hello", user="mallory", expect=77)

        if secret.encode() in demo.seen_by_developer:
            raise SystemExit("demo: FAILED: the key appeared in what a developer saw")
        print(f"\n{BOLD}Demo done: the job used the key; no developer could read it.{RESET}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--distro", choices=("bookworm", "trixie"), default="bookworm")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (it boots a container): sudo make demo")
    run(args.distro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
