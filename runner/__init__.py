"""jobrunner's service side: one short-lived, sandboxed process per connection that runs one job."""
