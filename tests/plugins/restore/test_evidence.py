"""Restore v2's end-to-end evidence in CI (issue 13, item 4), at its smallest: for the CNN and the ResNet owner
(both watermarks, short training), every registered structural edit composed with permutation, scaling and
batch-norm folding, written as safetensors and as ONNX (the export last), made by the attack plugins, checked
for function and audited as ``auditor audit --reference`` does. The functions are scripts/restore_evidence.py's
own, which runs the full set (each edit alone too) and writes the table in docs/restore.md."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

from auditor.plugins.restore import guard

SCRIPT = runpy.run_path(str(Path(__file__).parents[3] / "scripts" / "restore_evidence.py"), run_name="evidence")
EDITS: tuple[str, ...] = (*SCRIPT["STRUCTURAL"], *SCRIPT["LOSSY"])
FORMS: tuple[str, ...] = SCRIPT["FORMS"]
ARCHS = ("cnn", "resnet")

#: (architecture, edit, form) the restore stage does not undo yet, as measured (docs/restore.md, "Still out of
#: reach"); strict, so a fix shows up as a failure to update this list and the docs. None among the composed chains.
KNOWN_MISSES: set[tuple[str, str, str]] = set()

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The composed chains' rows by (architecture, edit, form); owners trained 8 epochs."""
    out = tmp_path_factory.mktemp("evidence")
    found = {}
    for arch in ARCHS:
        owner = SCRIPT["make_owner"](out / f"owner_{arch}", arch=arch, epochs=8)
        work = out / arch
        work.mkdir()
        for row in SCRIPT["evidence"](owner, arch, work, edits=EDITS, forms=FORMS, modes=("composed",),
                                      log=lambda _: None):  # fmt: skip
            found[arch, row["edit"], row["form"]] = row
    return found


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("arch", ARCHS)
def test_composed_edit_is_detected_after_restore(
    rows: dict[tuple[str, str, str], dict[str, Any]], arch: str, edit: str, form: str, request: pytest.FixtureRequest
) -> None:
    row = rows[arch, edit, form]
    if row["status"] in ("not registered", "n/a"):
        pytest.skip(f"{edit}: {row['status']} ({row.get('why')})")
    if row["status"] == "attack failed" and "changed the outputs" in row["why"]:
        pytest.skip(f"the attack refused to write this copy (its own function check, 3 seeds): {row['why']}")
    if (arch, edit, form) in KNOWN_MISSES:
        request.applymarker(pytest.mark.xfail(strict=True, reason="out of reach, see docs/restore.md"))
    assert row["status"] == "ok", row.get("why")
    if edit not in SCRIPT["LOSSY"]:
        assert row["function_kept"] and row["max_logit_change"] <= 1e-4, row["steps"]
    # Permutation alone defeats both schemes on the copy as it is: what follows is restore's doing.
    assert "detected" not in {f["verdict"] for f in row["direct"].values()}, row["direct"]
    found = row["restored"]
    assert set(found) == {"greedy-residuals", "hufunet"}
    gr, hufunet = found["greedy-residuals"], found["hufunet"]
    assert gr["verdict"] == "detected" and gr["rate"] >= gr["release_rate"] - 0.02, gr
    assert hufunet["verdict"] == "detected" and hufunet["diff_acc"] < hufunet["tau"], hufunet
    acted = [r for r in row["restore"] if r["acted"]]
    assert acted and all(r["derived"] and r["score"] >= guard.THRESHOLD for r in acted), row["restore"]
    assert all(r["status"] == "ok" for r in row["restore"]), row["restore"]
    if edit not in SCRIPT["LOSSY"]:  # the canonical form was reached by logged steps (fusions, merges, removals)
        logged = [step for r in acted for value in r["steps"].values() if isinstance(value, list) for step in value]
        assert logged, acted


def test_a_missing_attack_is_reported_not_faked(tmp_path: Path) -> None:
    row = SCRIPT["make_copy"]("no-such-edit", "onnx", "composed", model=tmp_path / "absent.safetensors",
                              work=tmp_path, x=None, seed=0, arch="cnn")  # fmt: skip
    assert row["status"] == "not registered" and "no-such-edit" in row["why"] and "file" not in row
