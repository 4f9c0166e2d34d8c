"""The round's code stays readable: the bars of issue 13, kept by a test."""

from __future__ import annotations

import ast
from pathlib import Path

import fedshield

SRC = Path(fedshield.__file__).parent
LIMIT = 100
SHORT = {("simulation/runner.py", "run_rounds"), ("api/run.py", "_simulate")}


def _functions(package: str):  # type: ignore[no-untyped-def]
    for path in sorted((SRC / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                yield str(path.relative_to(SRC)), node.name, lines


def test_no_function_in_the_round_or_the_api_is_over_100_lines() -> None:
    long = [
        f"{path}:{name} ({lines} lines)"
        for package in ("simulation", "api")
        for path, name, lines in _functions(package)
        if lines > LIMIT
    ]
    assert long == []


def test_the_round_loop_and_simulate_stay_under_60_lines() -> None:
    found = {
        (path, name): lines
        for package in ("simulation", "api")
        for path, name, lines in _functions(package)
        if (path, name) in SHORT
    }
    assert set(found) == SHORT
    assert all(lines < 60 for lines in found.values()), found
