"""jobrunner's systemd generator: the units of every job in jobs.toml (runner.units), at every boot and
every `systemctl daemon-reload`. See systemd.generator(7).

Why a generator rather than `jobrunner check` writing unit files: systemd runs it whenever it loads
units, so the jobs' units always match jobs.toml at boot and after any reload, with nothing left on
disk to go stale: its output directory is emptied before every run, so a removed job leaves no unit
behind. What a generator may not do (start or stop units) `jobrunner check` does after the reload
(runner.apply): start new jobs' sockets, stop removed ones'.

It reads jobs.toml itself, with tomllib: never the parsed copy, which a generator must not depend on.
An invalid file gives no job units at all: each connection to /run/job.sock then reports the error,
as it did before there were job units. It logs to stderr (the journal, or the kernel log at boot),
never quoting the file, and always exits 0: one bad file must not fail the daemon-reload.
"""

from __future__ import annotations

import os
import sys

from runner.config import DEFAULT_CONFIG_PATH, parse_file
from runner.errors import RunnerError
from runner.units import API_TEMPLATE_NAME, render, template_path, write


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 4):
        sys.stderr.write("usage: jobrunner-generator NORMAL_DIR [EARLY_DIR LATE_DIR]\n")
        return 64
    normal_dir = argv[1]
    path = os.environ.get("JOBRUNNER_CONFIG") or DEFAULT_CONFIG_PATH
    if not os.path.exists(path):
        return 0  # not configured (yet): no jobs, no units
    try:
        config = parse_file(path)
        with open(template_path(), encoding="utf-8") as f:
            template = f.read()
        api_template = ""
        if config.apis:
            with open(template_path(API_TEMPLATE_NAME), encoding="utf-8") as f:
                api_template = f.read()
    except RunnerError:
        sys.stderr.write(f"jobrunner-generator: {path} is invalid, no job units; see: sudo jobrunner check\n")
        return 0
    except OSError as e:
        sys.stderr.write(f"jobrunner-generator: cannot read {e.filename}: {e.strerror}\n")
        return 0
    try:
        write(render(config, template, api_template=api_template), normal_dir)
    except OSError as e:
        sys.stderr.write(f"jobrunner-generator: cannot write {e.filename}: {e.strerror}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
