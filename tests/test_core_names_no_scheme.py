"""The core knows no scheme: outside auditor/plugins/, no module names a built-in detector's scheme.

The names are taken from the registered built-in detectors (their ids, schemes
and titles, with dashes, underscores or spaces), so a new built-in is covered
without editing this test. The module paths in DEFAULT_PLUGINS are the one
place the core may spell a plugin's folder, and are left out.
"""

from __future__ import annotations

import re
from pathlib import Path

from auditor.bases import Detector
from auditor.plugin_manager import components, registered

PACKAGE = Path(__file__).resolve().parent.parent / "auditor"


def _builtin_names() -> set[str]:
    owners = {cid: reg.plugin for cid, reg in registered("detectors").items()}
    names: set[str] = set()
    for d in components("detectors", Detector):
        if owners[d.id].startswith("auditor.plugins."):
            names |= {n for n in (d.id, d.scheme, d.title) if n}
    return names


def _pattern(names: set[str]) -> re.Pattern[str]:
    spelled = [r"[-_ ]?".join(map(re.escape, re.split(r"[-_ ]", n))) for n in sorted(names)]
    return re.compile(r"\b(" + "|".join(spelled) + r")\b", re.IGNORECASE)


def test_the_built_in_schemes_are_known() -> None:
    names = {n.lower() for n in _builtin_names()}
    assert {"greedy-residuals", "hufunet"} <= names


def test_no_core_module_names_a_built_in_scheme() -> None:
    pattern = _pattern(_builtin_names())
    offenders = []
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix not in (".py", ".j2", ".css") or "plugins" in path.relative_to(PACKAGE).parts:
            continue
        text = re.sub(r"auditor\.plugins(\.\w+)+", "", path.read_text())
        for number, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_check_would_catch_a_scheme_name() -> None:
    pattern = _pattern(_builtin_names())
    assert pattern.search('if f.scheme == "greedy-residuals":')
    assert pattern.search("HufuNet's picture")
    assert pattern.search("context['greedy_residuals.p_threshold']")
    assert not pattern.search("the residuals of a layer")
