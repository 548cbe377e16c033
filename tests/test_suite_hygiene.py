"""The suite's own rules: fixtures are found by name (never imported from conftest), and no
fixture name is defined twice (a local one would silently shadow the shared one)."""
from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_fixture(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "fixture"


def test_every_fixture_name_is_defined_once():
    names = Counter()
    for path in TESTS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(map(_is_fixture, node.decorator_list)):
                names[node.name] += 1
    assert names, "no fixtures found: the scan is broken"
    assert [n for n, count in names.items() if count > 1] == []


def test_nothing_imports_conftest_or_a_fixture():
    fixtures = {node.name for path in TESTS.glob("*.py")
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.FunctionDef) and any(map(_is_fixture, node.decorator_list))}
    local = {path.stem for path in TESTS.glob("*.py")}  # the suite's own modules
    for path in TESTS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in local:
                assert node.module != "conftest", path.name
                imported = {alias.name for alias in node.names} & fixtures
                assert not imported, f"{path.name} imports the fixtures {sorted(imported)}"
