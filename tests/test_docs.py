"""The documentation install.sh installs links only to itself, and to headings that exist.

install.sh keeps the repository's layout under /usr/local/share/doc/jobrunner, so a link that works
in the repository works there too, as long as it points at a document that is installed."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def installed_docs() -> list[str]:
    script = (REPO / "install.sh").read_text()
    match = re.search(r"install_docs\(\) \{.*?for doc in ([^;]+);", script, re.DOTALL)
    assert match, "install.sh: no install_docs loop"
    return match.group(1).split()


def anchors(markdown: str) -> set[str]:
    """GitHub's ids for the headings: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.MULTILINE):
        text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        found.add(text.replace(" ", "-"))
    return found


def test_the_installed_docs_are_the_repositorys() -> None:
    docs = installed_docs()
    assert {"README.md", "INSTALL.md", "docs/protocol.md", "docs/performance.md", "docs/ci.md"} <= set(docs)
    for doc in docs:
        assert (REPO / doc).is_file(), doc


@pytest.mark.parametrize("doc", installed_docs())
def test_every_relative_link_leads_to_an_installed_doc_and_heading(doc: str) -> None:
    installed = set(installed_docs())
    text = (REPO / doc).read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https: and mailto: links leave the documentation
        path, _, fragment = target.partition("#")
        resolved = str(PurePosixPath(doc).parent / path) if path else doc
        resolved = str(PurePosixPath(resolved))  # "./x" as "x"
        assert resolved in installed, f"{doc}: link to {target}, which is not installed"
        if fragment:
            assert fragment in anchors((REPO / resolved).read_text()), f"{doc}: no heading for {target}"


def test_the_units_documentation_links_lead_to_installed_docs() -> None:
    # `systemctl help UNIT` opens these: each must be a document install.sh installs, where it puts it.
    installed = set(installed_docs())
    sources = [*(REPO / "units").iterdir(), REPO / "runner" / "units.py"]
    links = [
        (source.name, match)
        for source in sources
        for match in re.findall(
            r"^Documentation=file:///usr/local/share/doc/jobrunner/(\S+)$", source.read_text(), re.M
        )
    ]
    assert len(links) >= 10, links
    for source, doc in links:
        assert doc in installed, (
            f"{source}: Documentation= names {doc}, which install.sh does not install there"
        )
