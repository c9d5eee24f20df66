"""``auditor evaluate``: the grid, the audit of every attacked model before and after restore, the three
outputs, and resuming an interrupted run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from auditor.errors import UsageError
from auditor.plugin_manager import registered
from auditor.plugins.attacks.evaluate import STATE_FILE, evaluate_model
from auditor.plugins.attacks.grid import full_grid, quick_grid, select

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(owner: SimpleNamespace, out: Path, **kwargs: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "model": owner.files["safetensors"], "bundles": [owner.out / "owner_bundle.json"],
        "reference": owner.files["safetensors"], "out_dir": out, "grid": "quick", **kwargs,
    }  # fmt: skip
    return evaluate_model(**options)


def test_quick_grid_audits_every_cell_before_and_after_restore(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    results = _run(gr_owner, tmp_path / "eval")
    cells = {c["label"]: c for c in results["cells"]}
    assert [c["status"] for c in cells.values()] == ["ok"] * len(quick_grid())
    base = cells["no attack (the model as released)"]
    assert base["accuracy"] == pytest.approx(gr_owner.accuracy)
    assert base["direct"][0]["verdict"] == "detected"
    for label in ("permutation of every layer's channels", "batch-norm folded"):
        cell = cells[label]
        assert cell["function_preserving"] and cell["max_output_change"] <= 1e-4
        assert cell["accuracy"] == pytest.approx(gr_owner.accuracy)
        assert cell["restored"][0]["verdict"] == "detected", cell["restore"]
    permuted = cells["permutation of every layer's channels"]
    assert permuted["direct"][0]["verdict"] == "not-detected"  # restore is what finds it
    assert any(entry["acted"] for entry in permuted["restore"])
    pruned = cells["magnitude pruning global 90%"]
    assert pruned["accuracy"] < 0.5 and pruned["max_output_change"] > 1.0


def test_outputs_are_written_and_the_page_is_self_contained(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    results = _run(gr_owner, tmp_path / "eval", attacks=["prune-magnitude"])
    files = {k: Path(v) for k, v in results["files"].items()}
    data = json.loads(files["json"].read_text())
    assert len(data["cells"]) == 3 and data["summary"]
    assert any("magnitude pruning, global" in line for line in data["summary"])
    md = files["markdown"].read_text()
    assert "| magnitude pruning global 90% | pruning |" in md
    page = files["html"].read_text()
    assert page.count("<svg") == 1 and "<polyline" in page
    assert not re.search(r"<script|\bsrc=|\bhref=|@import|url\(", page)
    assert not (tmp_path / "eval" / "work").exists()


def test_an_interrupted_evaluation_resumes_where_it_stopped(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    seen: list[str] = []

    def stop_after_two(record: dict[str, Any]) -> None:
        seen.append(record["label"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(gr_owner, out, on_cell=stop_after_two)
    state = json.loads((out / STATE_FILE).read_text())
    assert len(state["cells"]) == 2
    rest: list[str] = []
    results = _run(gr_owner, out, on_cell=lambda r: rest.append(r["label"]))
    assert len(rest) == len(quick_grid()) - 2 and not set(rest) & set(seen)
    assert [c["label"] for c in results["cells"]] == [c.label for c in quick_grid()]
    again: list[str] = []
    _run(gr_owner, out, on_cell=lambda r: again.append(r["label"]))
    assert again == []
    with pytest.raises(UsageError, match="holds an evaluation of other inputs or settings; use another --out"):
        _run(gr_owner, out, seed=1)
    restarted: list[str] = []
    _run(gr_owner, out, seed=1, restart=True, attacks=["permute"], on_cell=lambda r: restarted.append(r["label"]))
    assert len(restarted) == 2


def test_the_full_grid_covers_every_attack() -> None:
    known = set(registered("attacks"))
    cells = full_grid(bundles={"greedy-residuals": "owner_bundle.json"})
    assert {c.attack for c in cells} - {"none"} == known
    assert len({c.key for c in cells}) == len(cells)
    fp = {c.attack for c in cells if c.group == "function-preserving"}
    assert all(registered("attacks")[a].component.function_preserving for a in fp)
    assert "forge-gr" not in {c.attack for c in full_grid()}  # no Greedy Residuals bundle: nothing to forge against
    with pytest.raises(UsageError, match="unknown attack"):
        select(cells, ["no-such-attack"], known)
    groups = [c.group for c in cells]
    assert groups.index("overwriting") > groups.index("fine-tuning") and groups[-1] == "forging"


def test_an_attack_plugin_adds_its_own_cells_to_the_grid(plugin: Any) -> None:
    from auditor import hookimpl
    from auditor.bases import Attack

    class Smudge(Attack):
        id = "test-smudge"
        scheme = "test-scheme"
        grid = (
            {"label": "smudge lightly", "group": "smudging", "options": {"amount": 0.1}},
            {"label": "smudge against the owner's bundle", "group": "smudging", "options": {"bundle": Attack.BUNDLE}},
        )

        def apply(self, model: Any, out: Any, *, options: Any) -> dict[str, Any]:
            return {}

    class Plugin:
        @hookimpl
        def register_attacks(self, register: Any) -> None:
            register(Smudge())

    with plugin(Plugin(), "test-smudge"):
        without = [c for c in full_grid() if c.attack == "test-smudge"]
        with_bundle = [c for c in full_grid(bundles={"test-scheme": "b.json"}) if c.attack == "test-smudge"]
    assert [c.label for c in without] == ["smudge lightly"]  # no bundle of its scheme: that cell is left out
    assert [dict(c.options) for c in with_bundle] == [{"amount": 0.1}, {"bundle": "b.json"}]
    assert all(c.group == "smudging" for c in with_bundle)
    assert "test-smudge" not in {c.attack for c in full_grid()}


def test_owner_factories_give_the_accuracy_and_the_thiefs_data(tmp_path: Path, owner_factories: dict[str, str]) -> None:
    """With the owner's own model and data, accuracy is measured on the owner's test split (not on
    digits) and the fine-tuning attacks train on the owner's data."""
    from auditor import keys
    from auditor.plugins.greedy_residuals.embedder import GreedyResidualsEmbedder

    pair = keys.generate_keypair(tmp_path / "keys", passphrase=None)
    summary = GreedyResidualsEmbedder().embed(
        out_dir=tmp_path / "owner",
        options={
            "key": pair.private,
            "message": "(c) C",
            "epochs": 3,
            "device": "cpu",
            "min_bits": 0,
            **owner_factories,
        },  # three steps: the figures here are accuracies, not the mark
    )
    model = tmp_path / "owner" / "model.safetensors"
    results = evaluate_model(model=model, bundles=[tmp_path / "owner" / "owner_bundle.json"], out_dir=tmp_path / "e",
                             attacks=["fine-tune"], **owner_factories)  # fmt: skip
    cells = results["cells"]
    assert [c["status"] for c in cells] == ["ok"] * len(cells) and len(cells) > 1
    assert cells[0]["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert all(round(c["accuracy"] * 30, 4).is_integer() for c in cells), [c["accuracy"] for c in cells]  # 30 tests
    assert all(c["summary"]["train_size"] == 60 for c in cells[1:]), [c["summary"] for c in cells[1:]]
