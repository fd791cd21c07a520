"""The manual pages in man/ stay true to the code: every option argparse knows is documented and every
documented option exists (jobctl(1), jobrunner(8)); jobs.toml(5) documents exactly the keys
runner/config.py accepts, table by table; every page has the usual sections, formats without warnings,
and is installed by install.sh.

Conventions the pages keep so that this can read them: an option is documented in the tag line of a
`.TP` item (the line after `.TP`), as `\\fB\\-\\-name\\fR`; a key of jobs.toml is a `.TP` item whose tag
starts `\\fBkey\\fR =`, under `.SS [runner]`, `.SS [jobs.NAME]` or `.SS [apis.NAME]`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from runner import admin, config
from trigger import jobctl

REPO = Path(__file__).resolve().parents[1]
MAN = REPO / "man"
PAGES = ("jobctl.1", "jobrunner.8", "jobs.toml.5", "job@.service.8")
SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "EXIT STATUS", "FILES", "ENVIRONMENT", "SEE ALSO")
OPTIONS_SECTION = {"jobctl.1": "OPTIONS", "jobrunner.8": "OPTIONS", "jobs.toml.5": "TABLES"}
KEY_TABLES = {"[runner]": config.RUNNER_KEYS, "[jobs.NAME]": config.JOB_KEYS, "[apis.NAME]": config.API_KEYS}
LONG_OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")
KEY_ITEM = re.compile(r"^\\fB([a-z_]+)\\fR =")
# What the pages may use: man(7) macros, and these escapes.
MACROS = frozenset(
    (
        ".TH",
        ".SH",
        ".SS",
        ".TP",
        ".B",
        ".I",
        ".BR",
        ".RB",
        ".RI",
        ".IR",
        ".BI",
        ".IB",
        ".IP",
        ".PP",
        ".EX",
        ".EE",
        ".nf",
        ".fi",
        ".br",
        ".nh",
    )
)
ESCAPE = re.compile(r"\\(-|f[BIRP]|e|&|%|\(lq|\(rq|\(aq| |\")")


def page(name: str) -> str:
    return (MAN / name).read_text(encoding="utf-8")


def plain(text: str) -> str:
    """Roff source as a reader sees it, near enough: no font changes, `\\-` as `-`."""
    text = re.sub(r"\\f[BIRP]", "", text)
    return text.replace("\\-", "-").replace("\\&", "").replace("\\%", "")


def item_tags(text: str) -> list[str]:
    """The tag line of every `.TP` item, as written."""
    lines = text.splitlines()
    return [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.strip() == ".TP"]


def parser_tree(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the parser and every subcommand's, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parser_tree(sub, (*path, name))


def options(parser: argparse.ArgumentParser) -> tuple[set[str], set[str], set[str]]:
    """The long options (without `--`), short options (with `-`) and command paths the parser knows."""
    longs: set[str] = set()
    shorts: set[str] = set()
    commands: set[str] = set()
    for path, sub in parser_tree(parser):
        if path:
            commands.add(" ".join(path))
        for action in sub._actions:
            for string in action.option_strings:
                if string.startswith("--"):
                    longs.add(string[2:])
                else:
                    shorts.add(string)
    return longs, shorts, commands


COMMAND_PAGES = {"jobctl.1": jobctl.build_parser, "jobrunner.8": admin.build_parser}


@pytest.mark.parametrize("name", COMMAND_PAGES)
def test_every_option_argparse_knows_is_documented(name: str) -> None:
    longs, shorts, _ = options(COMMAND_PAGES[name]())
    documented = {m for tag in item_tags(page(name)) for m in LONG_OPTION.findall(plain(tag))}
    assert longs - documented == set(), f"{name} does not document these options"
    text = plain(page(name))
    missing = {s for s in shorts if not re.search(rf"(?<![\w-]){re.escape(s)}(?![\w-])", text)}
    assert missing == set(), f"{name} does not mention these short options"


@pytest.mark.parametrize("name", COMMAND_PAGES)
def test_every_documented_option_exists(name: str) -> None:
    longs, _, _ = options(COMMAND_PAGES[name]())
    documented = {m for tag in item_tags(page(name)) for m in LONG_OPTION.findall(plain(tag))}
    assert documented, f"{name}: no option found in its .TP items: has the page's markup changed?"
    assert documented - longs == set(), f"{name} documents options that argparse does not know"


@pytest.mark.parametrize("name", COMMAND_PAGES)
def test_every_command_is_documented(name: str) -> None:
    _, _, commands = options(COMMAND_PAGES[name]())
    assert commands
    tags = [plain(tag) for tag in item_tags(page(name))]
    for command in commands:
        assert any(re.match(rf"{re.escape(command)}\b", tag) for tag in tags), (
            f"{name}: no .TP item for command {command!r}"
        )


def test_jobs_toml_documents_exactly_the_keys_of_each_table() -> None:
    found: dict[str, set[str]] = {table: set() for table in KEY_TABLES}
    table = None
    lines = page("jobs.toml.5").splitlines()
    for i, line in enumerate(lines):
        if line.startswith((".SH", ".SS")):
            table = line.split(None, 1)[1].strip() if line.startswith(".SS") else None
        elif line.strip() == ".TP" and i + 1 < len(lines):
            match = KEY_ITEM.match(lines[i + 1])
            if match:
                assert table in KEY_TABLES, f"key {match.group(1)!r} is documented outside the tables"
                found[table].add(match.group(1))
    for table, keys in KEY_TABLES.items():
        assert found[table] == set(keys), f"jobs.toml(5) {table}: documented vs runner/config.py"


def test_job_units_page_matches_the_units_and_the_runner() -> None:
    text = plain(page("job@.service.8"))
    for unit in sorted(p.name for p in (REPO / "units").iterdir()):
        assert unit in text, f"job@.service(8) does not mention units/{unit}"
    front_door = re.search(r'^FRONT_DOOR = "([^"]+)"', (REPO / "runner" / "__main__.py").read_text(), re.M)
    assert front_door
    assert front_door.group(1) in text


@pytest.mark.parametrize("name", PAGES)
def test_page_has_the_required_sections(name: str) -> None:
    headings = {line[4:].strip().strip('"') for line in page(name).splitlines() if line.startswith(".SH ")}
    required = (*SECTIONS, OPTIONS_SECTION.get(name, "OPTIONS"))
    assert [s for s in required if s not in headings] == []


@pytest.mark.parametrize("name", PAGES)
def test_page_is_plain_man7_roff(name: str) -> None:
    """What groff would also catch, for hosts without it; and the .TH line matches the file name."""
    text = page(name)
    lines = text.splitlines()
    title, section = name.rsplit(".", 1)
    assert lines[0].split()[1:3] == [title.upper(), section], ".TH NAME SECTION first"
    example = False  # inside .EX/.EE or .nf/.fi, where an empty line is an empty line
    for number, line in enumerate(lines, 1):
        where = f"{name}:{number}"
        example = line in {".EX", ".nf"} or (example and line not in {".EE", ".fi"})
        assert line == line.rstrip(), f"{where}: trailing whitespace"
        assert line.strip() or example, f"{where}: an empty line outside an example (use .PP)"
        assert not line.startswith("'"), f"{where}: a line starting with ' is a control line"
        if line.startswith("."):
            assert line.split()[0] in MACROS, f"{where}: not a man(7) macro: {line}"
        for i in (m.start() for m in re.finditer(r"\\", line)):
            if i > 0 and line[i - 1] == "\\":
                continue
            assert ESCAPE.match(line, i), f"{where}: unexpected escape at column {i + 1}: {line}"
    assert text.count("\n.EX\n") == text.count("\n.EE\n")
    assert text.endswith("\n")


@pytest.mark.parametrize("name", PAGES)
def test_page_formats_without_warnings(name: str) -> None:
    if shutil.which("groff"):
        argv = ["groff", "-man", "-ww", "-z", str(MAN / name)]
    elif shutil.which("man"):
        argv = ["man", "--warnings", "-l", str(MAN / name)]
    else:  # test_page_is_plain_man7_roff has checked what it can
        return
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


@pytest.mark.parametrize("name", PAGES)
def test_install_sh_installs_the_page(name: str) -> None:
    script = (REPO / "install.sh").read_text(encoding="utf-8")
    section = name.rsplit(".", 1)[1]
    assert re.search(rf"^MAN_PAGES=\(.*\bman{section}/{re.escape(name)}\b", script, re.M), (
        f"install.sh does not install {name} as man{section}/{name}"
    )
    assert re.search(r"^MANDIR=\$PREFIX/share/man$", script, re.M)
    install_man = script[script.index("install_man() {") :]
    assert '"$MANDIR/$page" 0644' in install_man[: install_man.index("\n}")]
    uninstall = script[script.index("uninstall() {") :]
    assert 'for page in "${MAN_PAGES[@]}"' in uninstall[: uninstall.index("\n}")]


def test_every_page_in_man_is_listed() -> None:
    assert sorted(p.name for p in MAN.iterdir()) == sorted(PAGES)
