"""The test suite keeps its own rules: folders mirror the package, and test modules share nothing but fixtures.

A test module that imports another (or a conftest.py) makes pytest keep one copy
of each imported fixture per importer, which is how shared training once ran
twice; a fixture in the folder's conftest.py is found by name instead.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "auditor"
NOT_A_PACKAGE_MIRROR = {"assets"}  # tiny model files and the scripts that make them


def _test_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if p.relative_to(TESTS).parts[0] not in NOT_A_PACKAGE_MIRROR)


def test_every_test_folder_mirrors_a_package_folder() -> None:
    folders = {p.parent for p in _test_files()} - {TESTS}
    assert folders, "no test folders found"
    for folder in sorted(folders):
        mirrored = PACKAGE / folder.relative_to(TESTS)
        assert (mirrored / "__init__.py").is_file(), f"tests/{folder.relative_to(TESTS)} mirrors no auditor/ package"


def test_no_test_module_imports_another_or_a_conftest() -> None:
    local = {p.stem for p in _test_files()} | {"tests"}
    offenders = []
    for path in _test_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                if name.startswith(".") or name.split(".")[0] in local:
                    offenders.append(f"{path.relative_to(TESTS.parent)}:{node.lineno} imports {name}")
    assert offenders == [], "share it as a fixture in a conftest.py instead"


def test_slow_marker_is_registered_and_used() -> None:
    pyproject = (TESTS.parent / "pyproject.toml").read_text()
    assert re.search(r'^markers = \[.*"slow: ', pyproject, re.M)
    assert "--strict-markers" in pyproject
    used = [p for p in _test_files() if p != Path(__file__).resolve() and "pytest.mark.slow" in p.read_text()]
    assert used, "no test is marked slow: `make test-fast` would run everything"
