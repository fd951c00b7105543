"""The module rules the code relies on: redis only in the index store, Flask only in the web shell."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "geo_route"


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_redis_store_imports_redis(path: Path) -> None:
    if path.relative_to(PACKAGE) != Path("index/redis_store.py"):
        assert "redis" not in imported_roots(path)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_web_shell_imports_flask(path: Path) -> None:
    if path.relative_to(PACKAGE).parts[0] != "web":
        assert "flask" not in imported_roots(path)


@pytest.mark.parametrize("module", ["routing.py", "operations.py", "access.py", "index/model.py", "contract.py"])
def test_the_decision_core_is_pure(module: str) -> None:
    assert not imported_roots(PACKAGE / module) & {"redis", "flask", "gunicorn", "time", "prometheus_client"}
