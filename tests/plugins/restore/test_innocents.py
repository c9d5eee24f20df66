"""No false claims with every restore step on (issue 13, item 5), at CI size: for each built-in architecture, a
few independently trained models (short training) and each one's copies under every registered structural edit
(written as ONNX, so every restore step has something to act on) are audited against the owner's bundles with
the owner's model as the reference. None may be claimed, and no restorer may act: each guard that was asked
must score the copy below its threshold. scripts/restore_evidence.py innocents runs the same functions on 20
models per architecture (docs/restore.md)."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

from auditor.plugins.restore import guard
from auditor.toolkit.models import ARCHITECTURES

SCRIPT = runpy.run_path(str(Path(__file__).parents[3] / "scripts" / "restore_evidence.py"), run_name="innocents")
EDITS: tuple[str, ...] = (*SCRIPT["STRUCTURAL"], *SCRIPT["LOSSY"])
MODELS = 3

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> list[dict[str, Any]]:
    """Every audited file's row: owners trained 6 epochs, innocents 2."""
    out = tmp_path_factory.mktemp("innocents")
    found = []
    for arch in sorted(ARCHITECTURES):
        owner = SCRIPT["make_owner"](out / f"owner_{arch}", arch=arch, epochs=6)
        work = out / arch
        work.mkdir()
        found += SCRIPT["innocents"](owner, arch, MODELS, 2, work, edits=EDITS, forms=("onnx",), log=lambda _: None)
    return found


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_innocents_are_never_claimed(rows: list[dict[str, Any]], arch: str) -> None:
    mine = [r for r in rows if r["arch"] == arch]
    audited = [r for r in mine if r["status"] == "ok"]
    assert len([r for r in audited if r["edit"] == "none"]) == MODELS  # every plain model was audited
    for row in audited:
        assert row["verdict"] != "detected", (row["edit"], row["findings"])
        for entry in row["restore"]:
            assert entry["status"] == "ok" and not entry["acted"], (row["edit"], entry)
            assert entry["score"] is None or entry["score"] < guard.THRESHOLD, (row["edit"], entry)


def test_the_guards_were_asked(rows: list[dict[str, Any]]) -> None:
    """The edited copies gave each restore step something to act on: a step that never consulted its guard
    would make the test above vacuous for it. Those steps that only run on their own kind of structure are
    asked wherever an edit made it."""
    asked = {e["restorer"] for r in rows if r["status"] == "ok" for e in r["restore"] if e["score"] is not None}
    made = {r["edit"] for r in rows if r["status"] == "ok" and r["edit"] != "none"}
    assert {"restore-channels", "restore-fold", "restore-scale"} <= asked
    if "factor-linear" in made:
        assert "restore-canonical" in asked
