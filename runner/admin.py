"""`jobrunner`: the administrator's command (the service itself is `python3 -m runner`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import NoReturn

from runner import apply, creds, doctor
from runner.config import Config, Network, Sandbox, clean_path, config_path, parse_file
from runner.config import check_config as check_and_cache
from runner.errors import ConfigError, RunnerError, quote_in_full
from runner.units import api_service_template, api_socket_unit, unit_names

EX_USAGE = 64
EX_INTERRUPTED = 130

EPILOG = """\
exit status:
  0    success
  1    doctor: at least one problem was found (see `jobrunner doctor --help`)
  64   usage error (unknown command or option, invalid credential name)
  65   creds set: the secret was refused (empty, under 8 bytes, over 1 MiB, or the entries differ)
  66   creds rm: no such credential
  69   systemd-creds or systemctl is missing or failed
  70   internal error
  74   reading or writing the credential store failed
  77   permission denied (creds set, rm and doctor need root; creds list needs to read the root-only store)
  78   check, reload: the configuration is invalid
  130  interrupted
"""

CREDS_DESCRIPTION = """\
Store the secrets (API keys) that jobs use, encrypted with systemd-creds. The units of a job that names
a credential in its `credentials` (jobs.toml) load it with LoadCredentialEncrypted=; no other unit does.
Values are never shown, and never decrypted by this command.
"""

CREDS_EPILOG = f"""\
files:
  {creds.CREDSTORE}/NAME
      the encrypted value; the directory is 0700 and the files 0600, root's
  {creds.DROPIN_DIR}/{creds.DROPIN_PREFIX}NAME{creds.DROPIN_SUFFIX}
      a legacy drop-in of earlier versions, which loaded NAME into every run: set and rm remove it

environment:
  JOBRUNNER_ROOT  prefix for these paths (default /), for tests and image builds; systemd-creds
                  still encrypts with this machine's key (and creates it if missing)

exit status:
  0    success
  64   usage error, or an invalid credential NAME
  65   creds set: the secret was refused (empty, under 8 bytes, over 1 MiB, or the entries differ)
  66   creds rm: no such credential
  69   systemd-creds is missing or failed
  70   internal error
  74   reading or writing the credential store failed
  77   not root (set, rm), or the root-only store cannot be read (list)
  130  interrupted
"""

SET_DESCRIPTION = f"""\
Encrypt a secret as credential NAME with `systemd-creds encrypt` (TPM2 and the host key where a TPM2
exists, the host key otherwise) into {creds.CREDSTORE}/NAME, where the units of the jobs that name it
load it from at their next start. An existing NAME is replaced. Must be run as root.

The secret is read from standard input when that is not a terminal, as in
  jobrunner creds set NAME < keyfile
Exactly one trailing newline is removed, nothing else: `echo KEY | jobrunner creds set NAME` stores KEY.
At a terminal it is asked for twice, without echo. It is never taken from the command line, never
written to disk unencrypted, and reaches systemd-creds only through a pipe.

Values shorter than {creds.MIN_SECRET_BYTES} bytes (not counting surrounding whitespace) are refused: the
runner removes every credential value from all job output, and so short a value would also match,
and mangle, ordinary text.
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 64 (EX_USAGE), as the epilog says, not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


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
    except KeyboardInterrupt:
        sys.stderr.write("\njobrunner: interrupted\n")
        return EX_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jobrunner",
        description="Administer jobrunner: check the job configuration, store the credentials jobs use.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    check = commands.add_parser("check", help="validate jobs.toml and list its jobs")
    check.add_argument(
        "--config", type=clean_path, default=None, help="the file to check (default: %(default)s)"
    )
    check.add_argument(
        "--quiet",
        action="store_true",
        help="print nothing when the file is valid, and not what is wrong when it is not (for "
        "jobrunner-config.service: the journal must not quote a file that may hold a pasted key)",
    )
    _add_no_reload(check, "do not bring the jobs' units in line afterwards (see `jobrunner reload`)")
    check.set_defaults(func=check_config, config=None)
    check.description = (
        f"Validate the job configuration (default {config_path()}), list its jobs with their units and "
        "credentials, and, as root on a host that runs systemd, bring the jobs' units in line with it "
        "(as `jobrunner reload` does)."
    )
    reload = commands.add_parser(
        "reload",
        help="bring the jobs' units in line with jobs.toml (root)",
        description="Regenerate the jobs' units from jobs.toml (systemctl daemon-reload runs jobrunner's "
        "generator), start the sockets of new jobs and stop those of removed jobs. Runs in progress go on. "
        "jobrunner-config.path does this on every change of jobs.toml.",
    )
    reload.set_defaults(func=reload_units)
    _add_creds(commands)
    doctor.add_parser(commands)
    return parser


def _add_creds(commands: argparse._SubParsersAction[_Parser]) -> None:
    group = commands.add_parser(
        "creds",
        help="store, list and remove the encrypted credentials jobs use",
        description=CREDS_DESCRIPTION,
        epilog=CREDS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = group.add_subparsers(title="commands", required=True, metavar="ACTION")
    set_ = actions.add_parser(
        "set",
        help="encrypt a secret from stdin or a no-echo prompt as NAME (root)",
        description=SET_DESCRIPTION,
        epilog=CREDS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    set_.add_argument("name", metavar="NAME", help="the credential name, as used in jobs.toml")
    _add_no_reload(set_, "accepted for scripts written for earlier versions; nothing needs a reload now")
    set_.set_defaults(func=creds_set)

    list_ = actions.add_parser(
        "list",
        help="list the stored credentials: names, sizes, dates, never values",
        description="List the stored credentials: name, size of the encrypted file, when it was last set,\n"
        "the key that sealed it (host+tpm2: this machine's TPM2 and host key; host: the host key\n"
        "only, no TPM2 was found), and the jobs that use it (jobs.toml). Never shows or decrypts a value.",
        epilog=CREDS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    list_.set_defaults(func=creds_list)

    rm = actions.add_parser(
        "rm",
        help="remove credential NAME (root)",
        description="Remove credential NAME: its encrypted file. The jobs that still name it then fail\n"
        "to start with an error that names it (the others are not affected).",
        epilog=CREDS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rm.add_argument("name", metavar="NAME")
    _add_no_reload(rm, "accepted for scripts written for earlier versions; nothing needs a reload now")
    rm.set_defaults(func=creds_rm)


def _add_no_reload(parser: _Parser, help_text: str) -> None:
    parser.add_argument("--no-reload", action="store_true", help=help_text)


def check_config(args: argparse.Namespace) -> int:
    if not args.quiet:
        quote_in_full()  # by hand: the administrator reads the file anyway
    try:
        config, cache, cache_error = check_and_cache(args.config)
    except ConfigError:
        if not args.quiet:
            raise
        # Not the error's message: it quotes the file (a key pasted into it by mistake, say), and this
        # process has no credentials to redact it with, unlike the runner.
        raise ConfigError(
            f"{args.config or config_path()} is invalid (not saying how: that may quote the file)",
            "run `sudo jobrunner check` to see it",
        ) from None
    if cache_error:
        _note(
            f"could not refresh the parsed copy {cache}: {cache_error.strerror}; until "
            "`sudo jobrunner check` does, each connection parses the file itself (slower, same result)"
        )
    if args.quiet:
        return 0
    print(f"{config.path}: ok, {len(config.jobs)} job(s); project {config.project}")
    if cache and not cache_error:
        print(f"  parsed copy for connections: {cache}")
    _print_jobs(config)
    if not args.no_reload and _may_apply(args):
        _apply(config)
    return 0


def _print_jobs(config: Config) -> None:
    """Each job with its network, credentials (NOT STORED where so) and groups, and its units."""
    stored = _stored_names()
    for job in config.jobs.values():
        extras = [f"network: {_network(job.sandbox)}"]
        if job.credentials:
            shown = [c if stored is None or c in stored else f"{c} (NOT STORED)" for c in job.credentials]
            extras.append(f"credentials: {', '.join(shown)}")
        if job.apis:
            extras.append(f"apis: {', '.join(job.apis)}")
        if job.allowed_groups:
            extras.append(f"groups: {', '.join(job.allowed_groups)}")
        print(f"  {job.name:<20} {job.description}" + (f" ({'; '.join(extras)})" if extras else ""))
        print(f"  {'':<20} units: {', '.join(unit_names(job.name))}")
    for api in config.apis.values():
        key = (
            api.credential if stored is None or api.credential in stored else f"{api.credential} (NOT STORED)"
        )
        jobs = ", ".join(job.name for job in config.jobs.values() if api.name in job.apis) or "none"
        print(f"  API {api.name:<16} {api.url} (key: {key}; jobs: {jobs})")
        print(f"  {'':<20} units: {api_socket_unit(api.name)}, {api_service_template(api.name)}")
        if stored is not None and api.credential not in stored:
            _warn(
                f"API '{api.name}' uses credential '{api.credential}', which is not stored: its requests get "
                f"502 until `sudo jobrunner creds set {api.credential}`"
            )
    for job in config.jobs.values():
        for name in job.credentials:
            if stored is not None and name not in stored:
                _warn(
                    f"job '{job.name}' names credential '{name}', which is not stored: its runs fail until "
                    f"`sudo jobrunner creds set {name}`"
                )


def reload_units(args: argparse.Namespace) -> int:
    creds.require_root("jobrunner reload")
    if not apply.systemd_running():
        raise apply.SystemdError("systemd is not running on this machine", "nothing to reload")
    _apply(parse_file(config_path()))
    return 0


def _may_apply(args: argparse.Namespace) -> bool:
    """Only for the system's configuration, as root, where systemd runs: `check --config FILE` and a
    developer's check change nothing."""
    return args.config in (None, config_path()) and os.geteuid() == 0 and apply.systemd_running()


def _apply(config: Config) -> None:
    for line in apply.apply_units(config):
        print(f"  {line}")


def _network(sandbox: Sandbox) -> str:
    if sandbox.network is Network.LISTED:
        return " ".join(sandbox.addresses)
    return str(sandbox.network)


def _stored_names() -> set[str] | None:
    """The names of the stored credentials, or None when the store cannot be read (not root)."""
    try:
        return {
            c.name for c in creds.CredentialStore.from_environment().list_credentials() if c.size is not None
        }
    except RunnerError:
        return None


def _jobs_using() -> dict[str, list[str]] | None:
    """credential name -> the jobs that name it (none without a jobs.toml); None (and a warning) when
    jobs.toml cannot be read."""
    if not os.path.exists(config_path()):
        return {}
    try:
        config = parse_file(config_path())
    except RunnerError:
        _warn(
            f"cannot read {config_path()} (`sudo jobrunner check` says why): not saying which jobs use what"
        )
        return None
    users: dict[str, list[str]] = {}
    for job in config.jobs.values():
        for name in job.credentials:
            users.setdefault(name, []).append(job.name)
    for api in config.apis.values():
        jobs = ", ".join(job.name for job in config.jobs.values() if api.name in job.apis) or "no job yet"
        users.setdefault(api.credential, []).append(f"API {api.name} ({jobs})")
    return users


def creds_set(args: argparse.Namespace) -> int:
    creds.require_root("jobrunner creds set")
    name = creds.check_name(args.name)
    creds.require_program("systemd-creds")  # before asking for the secret, not after
    stdin = sys.stdin.buffer if sys.stdin is not None else None
    secret = creds.read_secret(stdin, interactive=stdin is not None and stdin.isatty())
    result = creds.CredentialStore.from_environment().store(name, secret)
    del secret
    for note in result.notes:
        _note(note)
    print(f"{'Replaced' if result.replaced else 'Stored'} credential '{name}' in {result.path}")
    print(f"  encrypted by {result.key}")
    _reload_after_legacy(result.notes)
    users = (_jobs_using() or {}).get(name)
    if users:
        print(f"  used by: {', '.join(users)} (from their next run on)")
    else:
        print(f"No job uses it yet. In {config_path()}, either give it to a job (its table):")
        print(f'  credentials = ["{name}"]')
        print("or, for an HTTP API's key that jobs never see, name it in an [apis.NAME] table:")
        print(f'  credential = "{name}"')
    return 0


def creds_list(args: argparse.Namespace) -> int:
    store = creds.CredentialStore.from_environment()
    stored = store.list_credentials()
    if not stored:
        print(f"no credentials in {store.directory}")
        return 0
    known = _jobs_using()
    users = known or {}
    # KEY: what sealed it (the file's header), in systemd-creds' words: host+tpm2 (bound to this machine's
    # TPM2 and its host key), host (no TPM2 found), ...
    rows = [("NAME", "SIZE", "MODIFIED", "KEY", "JOBS")]
    for c in stored:
        size = "-" if c.size is None else str(c.size)
        modified = "-" if c.modified is None else _date(c.modified)
        key = "-" if c.size is None else creds.key_name(c.key)
        jobs = ", ".join(users.get(c.name, [])) or ("-" if known is not None else "?")
        rows.append((c.name, size, modified, key, jobs))
    width = max(len(r[0]) for r in rows)
    size_width = max(len(r[1]) for r in rows)
    key_width = max(len(r[3]) for r in rows)
    for name, size, modified, key, jobs in rows:
        print(f"{name:<{width}}  {size:>{size_width}}  {modified:<25}  {key:<{key_width}}  {jobs}")
    for c in stored:
        if c.size is None:
            _warn(f"'{c.name}' has a legacy drop-in but no encrypted file: `jobrunner creds rm {c.name}`")
        elif c.has_dropin:
            _warn(
                f"'{c.name}' has a legacy drop-in ({store.dropin(c.name)}) that loads it into every "
                f"run: `sudo jobrunner creds set {c.name}` or install.sh removes it"
            )
        elif known is not None and c.name not in users:
            _note(f"no job uses '{c.name}' (no `credentials` or [apis.*] in jobs.toml names it)")
        if c.mode is not None and c.mode & 0o077:
            _warn(f"{store.directory / c.name} has mode {c.mode:04o}: make it 0600 (chmod 600)")
    for name in sorted(set(users) - {c.name for c in stored if c.size is not None}):
        _warn(f"job(s) {', '.join(users[name])} name credential '{name}', which is not stored")
    return 0


def creds_rm(args: argparse.Namespace) -> int:
    creds.require_root("jobrunner creds rm")
    name = creds.check_name(args.name)
    store = creds.CredentialStore.from_environment()
    removed = store.remove(name)
    for path in removed:
        print(f"removed {path}")
    if store.dropin(name) in removed:
        _reload_after_legacy([str(store.dropin(name))])
    users = (_jobs_using() or {}).get(name)
    if users:
        _warn(
            f"job(s) {', '.join(users)} still name '{name}' in {config_path()}: their runs fail (saying so) "
            f"until it is stored again or removed from their `credentials`; other jobs are not affected"
        )
    return 0


def _reload_after_legacy(notes: Sequence[str]) -> None:
    """A legacy drop-in was removed (`notes` say so): systemd forgets it only at a reload."""
    if not any(creds.DROPIN_PREFIX in note for note in notes) or not apply.systemd_running():
        return
    try:
        apply.daemon_reload()
    except RunnerError as e:
        _warn(f"{e.message}: run `systemctl daemon-reload` for the removal to take effect")
    else:
        print("  systemd reloaded: the legacy drop-in no longer applies")


def _date(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _note(message: str) -> None:
    sys.stderr.write(f"jobrunner: note: {message}\n")


def _warn(message: str) -> None:
    sys.stderr.write(f"jobrunner: warning: {message}\n")


if __name__ == "__main__":
    sys.exit(main())
