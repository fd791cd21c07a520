"""The jobrunner client: ``jobctl`` and ``trigger_job.sh`` (standard library only)."""
