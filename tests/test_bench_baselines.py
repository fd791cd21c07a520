"""bench/run.py's Python baselines import exactly what their comments say: an extra import would move a
baseline that README's figures are ratios against (one slipped into the plain client once)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.test_bench_client import load_script

RUN = Path(__file__).resolve().parents[1] / "bench" / "run.py"


def imports_of(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_each_baseline_imports_only_what_it_is_meant_to() -> None:
    run = load_script(RUN)
    assert imports_of(run.FLOOR_PYTHON_SOURCE) == {"os"}
    assert imports_of(run.FLOOR_CONTRACT_SOURCE) == {
        "_socket",
        "os",
        "shlex",
        "systemd._daemon",
        "systemd._journal",
    }
    assert imports_of(run.CLIENT_FLOOR_SOURCE) == {"gc", "_socket", "argparse", "json", "sys"}
