"""runner/runs.py: run ids, the run's directories and `latest` link, the run log."""

from __future__ import annotations

import ast
import errno
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import pytest
from pytest_mock import MockerFixture

from runner.errors import InternalError
from runner.runs import RunLog, create_run_paths, iso_time, new_run_id

RUN_ID = re.compile(r"\d{8}T\d{6}-\d{6}-[0-9a-f]{8}")  # docs/protocol.md: YYYYMMDDTHHMMSS-UUUUUU-XXXXXXXX


# ------------------------------------------------------------------------------------------------ ids


def test_run_id_is_the_utc_start_time_to_the_microsecond() -> None:
    start = datetime(2026, 11, 28, 15, 44, 2, 123456, tzinfo=UTC)
    # A float cannot hold every microsecond exactly: aim between two, so rounding cannot matter.
    now = start.timestamp() + 0.4e-6

    run_id = new_run_id(now)

    assert RUN_ID.fullmatch(run_id)
    assert run_id.startswith("20261128T154402-123456-")


def test_run_id_of_the_current_time() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    run_id = new_run_id()
    after = datetime.now(UTC)

    assert RUN_ID.fullmatch(run_id)
    started = datetime.strptime(run_id[:22], "%Y%m%dT%H%M%S-%f").replace(tzinfo=UTC)
    assert before <= started <= after


def test_run_ids_sort_by_start_time() -> None:
    rng = random.Random(1128)
    # Start times spread over years, days and microseconds, at least 2 us apart.
    times = sorted(
        {rng.randrange(10**9, 4 * 10**9) * 1_000_000 + rng.randrange(0, 10**6, 2) for _ in range(2000)}
    )
    shuffled = [(new_run_id(t / 1_000_000), t) for t in times]
    rng.shuffle(shuffled)

    by_id = [t for _, t in sorted(shuffled)]

    assert by_id == times


def test_run_ids_do_not_repeat() -> None:
    ids = [new_run_id() for _ in range(10_000)]

    assert len(set(ids)) == len(ids)
    assert all(RUN_ID.fullmatch(i) for i in ids)


def test_run_id_random_part_varies_within_one_microsecond() -> None:
    ids = {new_run_id(1_764_344_642.5) for _ in range(64)}

    assert len(ids) > 32  # not a constant or a counter reset per process


# ----------------------------------------------------------------------------------------- paths


def test_create_run_paths_makes_the_directories_and_points_latest(tmp_path: Path) -> None:
    outputs, logs = tmp_path / "outputs", tmp_path / "logs"
    run_id = new_run_id()

    paths = create_run_paths(str(outputs), str(logs), "build", run_id)

    assert paths.output_dir == f"{outputs}/build/{run_id}"
    assert os.path.isdir(paths.output_dir)
    assert paths.log == f"{logs}/build/{run_id}.log"
    assert (logs / "build").is_dir()
    assert not os.path.exists(paths.log)  # RunLog creates it
    latest = outputs / "build" / "latest"
    assert latest.is_symlink()
    assert os.readlink(latest) == run_id  # relative: the tree can be moved or bind-mounted
    assert latest.resolve() == Path(paths.output_dir).resolve()


def test_latest_follows_the_newest_run_and_leaves_nothing_behind(tmp_path: Path) -> None:
    outputs, logs = tmp_path / "outputs", tmp_path / "logs"
    first = create_run_paths(str(outputs), str(logs), "build", "20260101T000000-000001-aaaa")
    second = create_run_paths(str(outputs), str(logs), "build", "20260101T000000-000002-bbbb")
    other = create_run_paths(str(outputs), str(logs), "lint", "20260101T000000-000003-cccc")

    assert (outputs / "build" / "latest").resolve() == Path(second.output_dir).resolve()
    assert (outputs / "lint" / "latest").resolve() == Path(other.output_dir).resolve()
    assert os.path.isdir(first.output_dir)
    assert sorted(p.name for p in (outputs / "build").iterdir()) == [
        "20260101T000000-000001-aaaa",
        "20260101T000000-000002-bbbb",
        "latest",
    ]


def test_latest_is_never_missing_while_it_is_replaced(tmp_path: Path) -> None:
    outputs, logs = tmp_path / "outputs", tmp_path / "logs"
    create_run_paths(str(outputs), str(logs), "build", new_run_id())
    latest = outputs / "build" / "latest"
    done = threading.Event()
    missing: list[int] = []

    def watch() -> None:
        while not done.is_set():
            try:
                os.readlink(latest)
            except FileNotFoundError:
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(300):
            create_run_paths(str(outputs), str(logs), "build", f"20260101T000000-{i:06d}-abcd")
    finally:
        done.set()
        watcher.join()

    assert missing == []
    assert os.readlink(latest) == "20260101T000000-000299-abcd"


def test_a_run_id_that_exists_already_is_never_reused(tmp_path: Path) -> None:
    outputs, logs = tmp_path / "outputs", tmp_path / "logs"
    paths = create_run_paths(str(outputs), str(logs), "build", "20260101T000000-000001-aaaa")
    result = Path(paths.output_dir) / "result.txt"
    result.write_text("first run")

    with pytest.raises(InternalError):
        create_run_paths(str(outputs), str(logs), "build", "20260101T000000-000001-aaaa")

    assert result.read_text() == "first run"


def test_unwritable_outputs_is_an_internal_error_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "outputs"
    blocker.write_text("a file where a directory should be")

    with pytest.raises(InternalError) as info:
        create_run_paths(str(blocker), str(tmp_path / "logs"), "build", new_run_id())

    assert str(blocker) in info.value.message
    assert info.value.hint


# ------------------------------------------------------------------------------------------- run log


def test_run_log_header_transcript_and_footer(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    log = RunLog(str(path))
    log.header({"job": "build", "run": "RID", "args": ["a b", "ü"], "detach": False})
    log.write(b"line one\n")
    log.write(b"\xff raw bytes, no newline")
    log.footer({"result": "exited with 0", "exit_code": 0})
    log.close()

    assert path.read_bytes() == (
        b"# jobrunner run log (a log without a '# ---- end' section is a run that never finished)\n"
        b"# job: build\n"
        b"# run: RID\n"
        b"# args: ['a b', '\xc3\xbc']\n"  # as Python writes a list
        b"# detach: false\n"
        b"# ---- output\n"
        b"line one\n"
        b"\xff raw bytes, no newline"
        b"\n"  # added: the footer starts on its own line
        b"# ---- end\n"
        b"# result: exited with 0\n"
        b"# exit_code: 0\n"
    )
    assert log.write_error is None


def test_run_log_footer_after_output_ending_in_a_newline(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    log = RunLog(str(path))
    log.header({})
    log.write(b"done\n")
    log.footer({"exit_code": 3})
    log.close()

    assert path.read_bytes().endswith(b"# ---- output\ndone\n# ---- end\n# exit_code: 3\n")


def test_run_log_is_on_disk_before_it_is_closed(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    log = RunLog(str(path))
    log.header({"job": "x"})
    log.write(b"progress 1\n")

    assert path.read_bytes().endswith(b"progress 1\n")  # unbuffered: survives a killed runner
    log.close()


def test_run_log_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    path.write_bytes(b"an earlier run")

    with pytest.raises(InternalError) as info:
        RunLog(str(path))

    assert str(path) in info.value.message
    assert path.read_bytes() == b"an earlier run"


class ShortWrites:
    """A file that takes at most `step` bytes per write (what a nearly full disk does)."""

    def __init__(self, file: BinaryIO, step: int, budget: int | None = None) -> None:
        self.file, self.step, self.budget = file, step, budget

    def write(self, data: bytes | memoryview) -> int:
        if self.budget is not None and self.budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(len(data), self.step, self.budget if self.budget is not None else len(data))
        written = self.file.write(bytes(data[:n]))
        assert written == n
        if self.budget is not None:
            self.budget -= n
        return n

    def close(self) -> None:
        self.file.close()


def test_run_log_completes_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run.log"
    log = RunLog(str(path))
    monkeypatch.setattr(log, "_file", ShortWrites(log._file, step=3))
    data = os.urandom(1000)

    log.write(data)
    log.close()

    assert path.read_bytes() == data
    assert log.write_error is None


def test_a_full_disk_keeps_what_fit_and_records_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "run.log"
    log = RunLog(str(path))
    log.header({"job": "build"})
    header = path.read_bytes()
    monkeypatch.setattr(log, "_file", ShortWrites(log._file, step=7, budget=20))

    log.write(b"a" * 15)
    log.write(b"b" * 15)  # the disk fills up in the middle of this one
    log.write(b"c" * 15)  # not attempted: the log is incomplete already
    log.footer({"exit_code": 0})
    log.close()

    assert isinstance(log.write_error, OSError)
    assert log.write_error.errno == errno.ENOSPC
    assert path.read_bytes() == header + b"a" * 15 + b"b" * 5


def test_dev_full_as_the_run_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = RunLog(str(tmp_path / "run.log"))
    real = log._file
    full = open("/dev/full", "wb", buffering=0)  # noqa: SIM115 - closed by log.close()
    monkeypatch.setattr(log, "_file", full)

    log.header({"job": "build"})
    log.write(b"output\n")
    log.footer({"exit_code": 0})
    log.close()
    real.close()

    assert isinstance(log.write_error, OSError)
    assert log.write_error.errno == errno.ENOSPC
    assert full.closed


def released_ranges(mocker: MockerFixture) -> list[tuple[int, int, int]]:
    """The (offset, length, advice) of every posix_fadvise call, which still runs for real."""
    calls: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((offset, length, advice))
        real(fd, offset, length, advice)

    mocker.patch.object(os, "posix_fadvise", side_effect=record)
    return calls


def test_a_large_run_log_hands_its_pages_back_as_it_grows(tmp_path: Path, mocker: MockerFixture) -> None:
    calls = released_ranges(mocker)
    path = tmp_path / "run.log"
    log = RunLog(str(path), release_cache_every=1 << 20)
    log.header({"job": "big"})
    chunk = b"x" * (512 << 10)

    for _ in range(5):  # released after the 2nd and 4th chunk
        log.write(chunk)
    assert calls == [(0, 0, os.POSIX_FADV_DONTNEED)] * 2  # the whole file each time
    log.close()

    assert len(calls) == 3  # and its tail when closed
    assert path.read_bytes().endswith(chunk * 5)  # advice only: nothing written is lost


def test_a_small_run_log_stays_cached(tmp_path: Path, mocker: MockerFixture) -> None:
    calls = released_ranges(mocker)
    log = RunLog(str(tmp_path / "run.log"))  # the default threshold: most runs print far less
    log.write(b"y" * (1 << 20))
    log.close()

    assert calls == []


def test_a_filesystem_that_refuses_the_advice_changes_nothing(tmp_path: Path, mocker: MockerFixture) -> None:
    mocker.patch.object(os, "posix_fadvise", side_effect=OSError(errno.EINVAL, "Invalid argument"))
    path = tmp_path / "run.log"
    log = RunLog(str(path), release_cache_every=10)

    log.write(b"0123456789abc")
    log.write(b"def")
    log.close()

    assert path.read_bytes() == b"0123456789abcdef"
    assert log.write_error is None


def resident_bytes(path: str) -> int:
    fincore = ["fincore", "--bytes", "--noheadings", "--output", "RES", path]
    return int(subprocess.run(fincore, capture_output=True, check=True).stdout)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)  # fsync through any descriptor writes the file's pages out
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")
def test_the_page_cache_really_lets_go_of_a_large_run_log() -> None:
    # On a disk, as a project's logs directory is: a tmpfs has nowhere to write its pages to and keeps them.
    directory = tempfile.mkdtemp(prefix="jobrunner-test-", dir="/var/tmp")
    filesystem = subprocess.run(
        ["stat", "-f", "-c", "%T", directory], capture_output=True, text=True, check=True
    )
    if filesystem.stdout.strip() == "tmpfs":
        os.rmdir(directory)
        pytest.skip("/var/tmp is a tmpfs here")
    size, chunk = 64 << 20, os.urandom(1 << 20)
    try:
        resident = {}
        for name, every in (("kept", 0), ("released", 16 << 20)):
            path = os.path.join(directory, f"{name}.log")
            log = RunLog(path, release_cache_every=every)
            for _ in range(size // len(chunk)):
                log.write(chunk)
            # The kernel drops only pages already on disk; how many are when the run ends depends on
            # the disk's speed. On disk all of them: then closing the log must let go of every one.
            fsync_path(path)
            log.close()
            resident[name] = resident_bytes(path)
            assert os.path.getsize(path) == size
    finally:
        shutil.rmtree(directory)

    assert resident["kept"] > size // 2, resident  # without advice the kernel keeps the pages it was given
    assert resident["released"] == 0, resident


# ------------------------------------------------------------------------------------------------ time


@pytest.mark.parametrize("t", [0.0, 1_764_344_642.25, 1_764_344_642.125, 4_102_444_800.5])
def test_iso_time(t: float) -> None:
    expected = datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    assert iso_time(t) == expected


def test_header_values_are_rendered_for_people_without_json(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    log = RunLog(str(path))
    log.header(
        {
            "args": ["x\n# result: forged"],
            "command": ["/p/bin/build", "--all", "it's", "", "a\tb", "\x1b[31m"],
            "none": [],
            "n": 3,
            "f": 1.5,
            "yes": True,
            "no": False,
            "s": "plain",
        }
    )
    log.close()

    header_lines = path.read_text().splitlines()
    # A newline in a value cannot start a line of its own (and forge a footer field).
    assert header_lines[1] == "# args: ['x\\n# result: forged']"
    assert header_lines[2] == "# command: ['/p/bin/build', '--all', \"it's\", '', 'a\\tb', '\\x1b[31m']"
    assert header_lines[3:] == [
        "# none: []",
        "# n: 3",
        "# f: 1.5",
        "# yes: true",
        "# no: false",
        "# s: plain",
        "# ---- output",
    ]


WORDS = [
    "plain",
    "two words",
    "",
    "it's",
    'say "hi"',
    "back\\slash",
    "$HOME `id` $(id) *",
    "ü and 漢字 and 🙂",
    "x\n# result: forged",
    "\r\t\x00\x1b\x7f",
    "\x85 \u00a0 \u2028 \U000e0001",
    "'\n'",
]


def test_list_values_stay_on_their_line_and_read_back_as_the_same_words(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    log = RunLog(str(path))
    log.header({"args": WORDS})
    log.close()

    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[2] == "# ---- output"  # one line for the whole list, whatever the words hold
    rendered = lines[1].removeprefix("# args: ")
    assert ast.literal_eval(rendered) == WORDS
