"""`jobrunner doctor`: the installation audits itself (issue #14).

Each check looks at what is, not at what the configuration says should be: the modes and owners of the
files, what systemd has loaded, what `systemd-analyze security` rates, and, for the protections the
jobs' units ask for (IPAddressDeny=, TasksMax=, MemoryMax=), what this host really enforces, found by
probing with short-lived transient units rather than guessed from the version: a container or a kernel
without a cgroup controller accepts those settings and ignores them.

A check is a function from a Context to Findings (ok, warning or problem, with the fix for the last two);
`run_checks` runs them in order and reports a check that raised as a problem of that check, never as a
traceback. No check ever holds a credential's value: `systemd-creds decrypt` writes it to /dev/null.

One module per topic: base (findings, the context, shared paths and figures), probes (what the host
enforces), credentials, access (sockets, polkit, administrators, writable paths), installation (loaded
units, outputs and logs, security scores) and command (the checks in order, the parser, the output).
"""

from runner.doctor.command import add_parser, main

__all__ = ["add_parser", "main"]
