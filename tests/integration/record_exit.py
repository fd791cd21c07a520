"""Runs the runner exactly as `python3 -m runner` does, and appends its exit status to a file.

systemd-socket-activate only logs a child's status when the next connection arrives; the tests want
to see each runner's status as soon as it exits (the same process, so LISTEN_PID still matches).
"""

import sys
from pathlib import Path

from runner.__main__ import main

status_file = Path(sys.argv.pop(1))
try:
    status = main(sys.argv)
finally:
    with status_file.open("a") as f:
        f.write(f"{locals().get('status', 'exception')}\n")
sys.exit(status)
