"""Meta-tests: every hook is tested and documented; the README's exit codes are the real ones."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from auditor import hookspecs
from auditor.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "auditor_spec"))


def test_hooks_are_found() -> None:
    assert len(HOOKS) == 7, HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook: str) -> None:
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    assert re.search(rf"^def test_hook_{hook}\(", tests, re.M), f"no test_hook_{hook} in tests/"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook: str) -> None:
    doc = (ROOT / "docs" / "plugin_hooks.md").read_text()
    section = re.search(rf"^### `{hook}`\n(.*?)(?=^### |\Z)", doc, re.M | re.S)
    assert section, f"no section for {hook} in docs/plugin_hooks.md"
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"def {hook}({params}:" in section.group(1)


def test_every_hook_has_a_docstring() -> None:
    for hook in HOOKS:
        assert (getattr(hookspecs, hook).__doc__ or "").strip(), hook


def test_readme_lists_every_exit_code() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", readme, re.M))
    assert {int(k): v for k, v in rows.items()} == EXIT_CODES
