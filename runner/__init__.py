"""jobrunner's service side: three programs that share this package.

- The runner (`__main__`, then `service`): one short-lived, sandboxed process per connection or
  operator start. As the front door (job@.service) it answers `list` and hands runs over (`handoff`);
  in a job's own unit it runs that job (`execute`, `redact`, `runs`, `channel`, `limits`, `lock`, ...).
- The generator (`generator`, `units`): each job's units from jobs.toml, at boot and every reload.
- The administrator's command, `jobrunner` (`admin`, then `creds`, `apply`).
What they share: `config` (jobs.toml), `errors`, `value`, `credentials`.
"""
