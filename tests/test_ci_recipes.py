"""docs/ci.md's recipes as files: each one is there, and the events printer prints what it says.

The recipes themselves run under real systemd in tests/e2e/test_ci_recipes.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ci_recipes import github_step_script, gitlab_script, recipes


def test_every_recipe_is_in_the_doc() -> None:
    found = recipes()
    assert "jobctl --json run build" in github_step_script(found["github"])
    assert gitlab_script(found["gitlab"]).startswith("set -o pipefail\njobctl --json run build")
    assert found["post-receive"].startswith("#!/bin/sh\n")


def test_a_missing_recipe_is_an_error() -> None:
    with pytest.raises(ValueError, match="no recipe"):
        recipes("<!-- recipe: github -->\n```yaml\nrun: |\n  true\n```\n")


def printed(tmp_path: Path, *events: dict[str, object]) -> subprocess.CompletedProcess[str]:
    printer = tmp_path / "jobrunner-events.py"
    printer.write_text(recipes()["events-printer"])
    lines = "".join(json.dumps(event) + "\n" for event in events)
    return subprocess.run(
        [sys.executable, str(printer)], input=lines, capture_output=True, text=True, check=False
    )


def test_the_printer_shows_the_output_then_how_the_run_ended(tmp_path: Path) -> None:
    result = printed(
        tmp_path,
        {"event": "accepted", "job": "build", "run_id": "R1", "output_dir": "/o", "log": "/l", "detach": False},
        {"event": "output", "stream": "stdout", "text": "built\n"},
        {"event": "output", "stream": "stderr", "text": "a warning\n"},
        {"event": "output", "stream": "stdout", "base64": "/w=="},
        {
            "event": "exit", "job": "build", "run_id": "R1", "exit_code": 3, "signal": None,
            "timed_out": False, "cancelled": False, "duration_s": 1.25, "log": "/l/R1.log",
            "output_dir": "/o", "warnings": ["the run log is incomplete"],
        },
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "built\n[binary output, in the run log]\n"
    assert result.stderr == (
        "a warning\njobrunner: build run R1 exited 3 after 1.2 s; log /l/R1.log; "
        "warning: the run log is incomplete\n"
    )


def test_the_printer_shows_an_error(tmp_path: Path) -> None:
    result = printed(
        tmp_path, {"event": "error", "code": "busy", "message": "build is running", "hint": "later"}
    )
    assert result.returncode == 0
    assert result.stderr == "jobrunner: error busy: build is running later\n"
