"""The CI recipes of docs/ci.md, read from the file itself, so that the tests run what users copy.

Each recipe is the fenced block after a ``<!-- recipe: NAME -->`` line. What a CI system would run of
it is taken out the way that system does: a GitHub Actions step's ``run: |`` block, a GitLab job's
``script:`` lines; the events printer and the ``post-receive`` hook are files, taken whole.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "ci.md"
NAMES = ("events-printer", "github", "gitlab", "post-receive")

_RECIPE = re.compile(r"^<!-- recipe: ([a-z-]+) -->\n```[a-z]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def recipes(text: str | None = None) -> dict[str, str]:
    """Each recipe's block, by name; every name in NAMES exactly once."""
    found: dict[str, str] = {}
    for match in _RECIPE.finditer(DOC.read_text() if text is None else text):
        name, body = match.groups()
        if name in found:
            raise ValueError(f"docs/ci.md: recipe {name!r} twice")
        found[name] = body
    missing = sorted(set(NAMES) - set(found))
    if missing:
        raise ValueError(f"docs/ci.md: no recipe {missing}")
    return found


def github_step_script(workflow: str) -> str:
    """The `run: |` block of the workflow's step that has one, as the runner writes it to a file."""
    lines = workflow.splitlines()
    for index, line in enumerate(lines):
        match = re.fullmatch(r"( *)run: \|", line)
        if match:
            indent = len(match.group(1))
            block = []
            for following in lines[index + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following)
            return textwrap.dedent("\n".join(block)).strip() + "\n"
    raise ValueError("the workflow has no `run: |` step")


def gitlab_script(pipeline: str) -> str:
    """The job's `script:` lines, one command each, as a shell runner runs them in one shell."""
    lines = pipeline.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "script:")
    commands = []
    for line in lines[start + 1 :]:
        match = re.fullmatch(r" +- (.*)", line)
        if not match:
            break
        commands.append(match.group(1))
    if not commands:
        raise ValueError("the job's script: has no lines")
    return "\n".join(commands) + "\n"
