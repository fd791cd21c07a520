"""`jobrunner`: the administrator's command (the service itself is `python3 -m runner`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runner.config import config_path, load_config
from runner.errors import RunnerError

EPILOG = """\
exit status:
  0   success
  64  usage error
  78  the configuration is invalid
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
        return status
    except RunnerError as e:
        sys.stderr.write(f"jobrunner: error: {e.message}\n")
        if e.hint:
            sys.stderr.write(f"jobrunner: hint: {e.hint}\n")
        return e.exit_status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobrunner",
        description="Administer jobrunner: check the job configuration.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    check = commands.add_parser("check", help="validate jobs.toml and list its jobs")
    check.add_argument("--config", type=Path, default=None, help="the file to check (default: %(default)s)")
    check.set_defaults(func=check_config, config=None)
    check.description = f"Validate the job configuration (default {config_path()}) and list its jobs."
    return parser


def check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{config.path}: ok, {len(config.jobs)} job(s); project {config.project}")
    for job in config.jobs.values():
        extras = [f"credentials: {', '.join(job.credentials)}"] if job.credentials else []
        if job.allowed_groups:
            extras.append(f"groups: {', '.join(job.allowed_groups)}")
        print(f"  {job.name:<20} {job.description}" + (f" ({'; '.join(extras)})" if extras else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
