"""docs/ci.md's recipes, run as written, under real systemd (tests/ci_recipes.py reads them).

A GitHub Actions step and a GitLab script run as a CI user in the socket's group, in bash the way
each CI system runs them; the post-receive hook runs in a bare repository that a developer pushes
to. Each must pass the job's output through, and fail with the job's (or jobctl's) status."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator

import pytest

from tests.ci_recipes import github_step_script, gitlab_script, recipes

from .conftest import Installation, jobs_toml, write_jobs

pytestmark = pytest.mark.e2e

CI_USER = "ci"
WORKSPACE = "/srv/ci-workspace"
GOOD = "1" * 40
BAD = "0" * 40  # bin/ci-build fails for this commit

BUILD_JOB = """
[jobs.build]
description = "docs/ci.md's example job"
command = ["bin/ci-build"]
args = "[0-9a-f]{40}"
concurrency = "parallel"
"""

CI_BUILD = """#!/bin/sh
echo "building $1 with {version}"
echo "a note on stderr" >&2
[ "$1" != {bad} ] || exit 3
"""


@pytest.fixture(scope="module")
def ci(installed: Installation) -> Iterator[Installation]:
    """A CI user in the socket's group, the `build` job of docs/ci.md, and the recipe's printer."""
    ct = installed.container
    ct.run(["sh", "-c", f"id {CI_USER} >/dev/null 2>&1 || useradd --create-home {CI_USER}"])
    ct.run(["usermod", "--append", "--groups", installed.group, CI_USER])
    write_jobs(ct, jobs_toml() + BUILD_JOB)
    try:
        yield installed
    finally:
        write_jobs(ct, jobs_toml())
        ct.run(["rm", "-rf", f"{installed.project}/bin/ci-build", WORKSPACE])
        ct.run(["userdel", "--remove", CI_USER], check=False)


def put_build(inst: Installation, version: str) -> None:
    path = f"{inst.project}/bin/ci-build"
    inst.container.write_file(path, CI_BUILD.format(version=version, bad=BAD), mode=0o755)
    inst.container.run(["chown", f"{inst.developer}:{inst.developer}", path])


def workspace(inst: Installation, script: str) -> None:
    """A fresh checkout as the CI system makes it: the printer at ci/jobrunner-events.py, the step."""
    ct = inst.container
    ct.run(["rm", "-rf", WORKSPACE])
    ct.write_file(f"{WORKSPACE}/ci/jobrunner-events.py", recipes()["events-printer"])
    ct.write_file(f"{WORKSPACE}/step.sh", script)
    ct.run(["chown", "-R", f"{CI_USER}:{CI_USER}", WORKSPACE])


def in_workspace(
    inst: Installation, shell: str, env: dict[str, str], user: str = CI_USER
) -> subprocess.CompletedProcess[bytes]:
    command = f"cd {WORKSPACE} && exec {shell} step.sh"
    return inst.container.run(["sh", "-c", command], user=user, env=env, check=False, timeout=120)


def last_event(inst: Installation) -> dict[str, object]:
    lines = inst.container.run(["cat", f"{WORKSPACE}/jobrunner.jsonl"]).stdout.decode().splitlines()
    event: dict[str, object] = json.loads(lines[-1])
    return event


# GitHub's `shell: bash` is `bash --noprofile --norc -eo pipefail {0}`; GitLab's shell runner runs the
# script lines in one bash that stops at the first failure (set -e), with no pipefail of its own.
GITHUB_BASH = "bash --noprofile --norc -eo pipefail"
GITLAB_BASH = "bash -e"


def test_the_github_step_passes_the_output_and_the_jobs_status(ci: Installation) -> None:
    put_build(ci, "v1")
    workspace(ci, github_step_script(recipes()["github"]))
    summary = f"{WORKSPACE}/summary.md"
    good = in_workspace(ci, GITHUB_BASH, {"GITHUB_SHA": GOOD, "GITHUB_STEP_SUMMARY": summary})
    assert good.returncode == 0, good.stderr
    assert good.stdout.decode() == f"building {GOOD} with v1\n"
    ended = last_event(ci)
    assert ended["event"] == "exit" and ended["exit_code"] == 0
    assert re.search(
        rf"jobrunner: build run {ended['run_id']} exited 0 after \d+\.\d s", good.stderr.decode()
    )
    assert json.loads(ci.container.run(["cat", summary]).stdout) == ended

    bad = in_workspace(ci, GITHUB_BASH, {"GITHUB_SHA": BAD, "GITHUB_STEP_SUMMARY": summary})
    assert bad.returncode == 3, bad.stderr  # the job's status, not the printer's
    assert b"a note on stderr" in bad.stderr and b"exited 3" in bad.stderr
    assert last_event(ci)["exit_code"] == 3


def test_the_github_step_fails_with_jobctls_own_status(ci: Installation) -> None:
    put_build(ci, "v1")
    workspace(ci, github_step_script(recipes()["github"]))
    env = {"GITHUB_SHA": "not-a-commit", "GITHUB_STEP_SUMMARY": f"{WORKSPACE}/summary.md"}
    refused = in_workspace(ci, GITHUB_BASH, env)
    assert refused.returncode == 64, refused.stderr  # arguments the job's `args` pattern refuses
    assert b"jobrunner: error bad-arguments" in refused.stderr
    # A CI user outside the socket's group: jobctl cannot connect (77), and says why.
    ci.container.run(["chmod", "-R", "a+rwX", WORKSPACE])
    outside = in_workspace(ci, GITHUB_BASH, {**env, "GITHUB_SHA": GOOD}, user=ci.outsider)
    assert outside.returncode == 77, outside.stderr
    assert b"permission denied" in outside.stderr.lower()


def test_the_gitlab_script_passes_the_output_and_the_jobs_status(ci: Installation) -> None:
    put_build(ci, "v1")
    workspace(ci, gitlab_script(recipes()["gitlab"]))
    good = in_workspace(ci, GITLAB_BASH, {"CI_COMMIT_SHA": GOOD})
    assert good.returncode == 0, good.stderr
    assert good.stdout.decode() == f"building {GOOD} with v1\n"
    assert last_event(ci)["exit_code"] == 0
    bad = in_workspace(ci, GITLAB_BASH, {"CI_COMMIT_SHA": BAD})
    assert bad.returncode == 3, bad.stderr  # set -o pipefail in the recipe: without it, the printer's 0
    assert last_event(ci)["event"] == "exit" and b"exited 3" in bad.stderr


def test_a_push_deploys_main_and_starts_the_job_on_it(ci: Installation) -> None:
    ct, dev = ci.container, ci.developer
    repo, clone = f"/home/{dev}/project.git", f"/home/{dev}/clone"
    ct.run(["rm", "-rf", repo, clone, f"{ci.project}/bin/ci-build"])
    recipe = recipes()["post-receive"]
    assert "\nproject=/srv/myproject " in recipe  # the one line a user adapts
    hook = recipe.replace("\nproject=/srv/myproject ", f"\nproject={ci.project} ", 1)
    ct.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", repo], user=dev)
    ct.write_file(f"{repo}/hooks/post-receive", hook, mode=0o755)
    ct.run(["chown", f"{dev}:{dev}", f"{repo}/hooks/post-receive"])
    ct.run(["git", "clone", "--quiet", repo, clone], user=dev)
    git = f"git -C {clone} -c user.name=Dev -c user.email=dev@example.com"
    try:
        for version in ("v1", "v2"):
            script = CI_BUILD.format(version=version, bad=BAD)
            push = ct.run(["sh", "-euc", f"""
mkdir -p {clone}/bin
printf %s {shlex.quote(script)} > {clone}/bin/ci-build
chmod +x {clone}/bin/ci-build
{git} add bin/ci-build
{git} commit --quiet -m {version}
{git} push --quiet origin main 2>&1"""], user=dev, timeout=120)  # fmt: skip
            pushed = push.stdout.decode()
            match = re.search(
                r"remote: jobrunner: build started as run (\S+): jobctl logs --follow \1", pushed
            )
            assert match, pushed
            # The job ran the code just pushed: the hook put it in the project before starting it.
            followed = ci.jobctl("logs", "--follow", match.group(1))
            assert followed.returncode == 0, followed.stderr
            commit = ct.run(["git", "-C", clone, "rev-parse", "HEAD"], user=dev).stdout.decode().strip()
            assert f"building {commit} with {version}" in followed.stdout.decode()
    finally:
        ct.run(["rm", "-rf", repo, clone])
