"""Greedy Residuals detector on trained SmallCNNs (digits, fixed seeds): integrity and file formats.

The owner's watermarked model is trained once per module through the owner
API and written with the project's own writer; suspects are read back from
files, as an audit reads them. Measured numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from types import SimpleNamespace

import pytest
import torch

from auditor.audit.detect import run_detectors
from auditor.audit.load import load_model
from auditor.findings import Finding, Verdict
from auditor.graph import LayerGraph
from auditor.plugins.greedy_residuals.detector import GreedyResidualsDetector, forging_check
from auditor.toolkit import models as zoo
from auditor.toolkit import training

INNOCENTS = 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def owner(gr_owner: SimpleNamespace) -> SimpleNamespace:
    return gr_owner


def detect(graph: LayerGraph, owner: SimpleNamespace, **options: object) -> Finding:
    (finding,) = GreedyResidualsDetector().detect(graph, bundle=owner.bundle, context={"options": options})
    return finding


def test_owner_bundle_detects_the_released_model(owner: SimpleNamespace) -> None:
    findings = run_detectors(load_model(owner.files["safetensors"]), bundles=[owner.bundle])
    (finding,) = [f for f in findings if f.detector == "greedy-residuals"]
    assert finding.verdict is Verdict.DETECTED
    assert finding.subject == f"{owner.bundle.sha256[:12]} {owner.wm.message}"
    assert finding.summary.startswith("The suspect carries the owner's signature: in layer ")
    assert owner.bundle.payload["signature"] not in str(finding.to_dict())
    release = {row["name"]: row["release_rate"] for row in finding.details["layers"]}
    assert release == {layer.name: rate for layer, rate in zip(owner.wm.layers, owner.wm.rates(owner.model).values())}
    assert all(row["rate_shift"] == 0.0 and row["folded"] is False for row in finding.details["layers"])


# --- integrity -----------------------------------------------------------------------


@pytest.mark.slow
def test_innocent_models_never_reach_the_threshold(owner: SimpleNamespace) -> None:
    rates, ps, accuracies = [], [], []
    for seed in range(1, INNOCENTS + 1):
        model = zoo.build("cnn", seed=1000 + seed)
        # The owner's recipe without the penalty: real, independently trained competitors.
        training.train(model, owner.data.train, training.TrainConfig(epochs=8, lr=1e-2, seed=seed))
        accuracies.append(training.evaluate(model, owner.data.test))
        files = training.save_model(model, owner.out / "innocents", f"innocent{seed}")
        finding = detect(load_model(files["safetensors"]), owner)
        assert finding.verdict is Verdict.NOT_DETECTED, finding.summary
        assert "negated" not in finding.summary  # a rate under 0.5 by chance is no negation story
        rates += [row["rate"] for row in finding.details["layers"]]
        ps.append(finding.metrics["combined_p"])
    print(
        f"\n{INNOCENTS} innocent models (accuracy {min(accuracies):.3f}..{max(accuracies):.3f}): "
        f"rates {min(rates):.3f}..{max(rates):.3f}, min combined p {min(ps):.3g}"
    )
    assert min(ps) >= 1e-6
    assert min(accuracies) >= 0.9  # they are working models, not untrained noise


def test_random_signatures_score_about_half(owner: SimpleNamespace) -> None:
    suspect = load_model(owner.files["safetensors"])
    rates = forging_check(suspect, owner.bundle, n=200, seed=0)
    mean = sum(rates) / len(rates)
    print(
        f"\n200 random signatures on the watermarked model: mean {mean:.4f}, range {min(rates):.3f}..{max(rates):.3f}"
    )
    assert len(rates) == 200
    assert 0.45 <= mean <= 0.55
    finding = detect(suspect, owner, forging_check=True)
    assert finding.details["forging_check"]["mean_rate"] == pytest.approx(mean)
    assert finding.verdict is Verdict.DETECTED


# --- formats -------------------------------------------------------------------------


def test_pytorch_and_safetensors_give_identical_findings(owner: SimpleNamespace) -> None:
    from_pt = detect(load_model(owner.files["pt"]), owner)
    from_st = detect(load_model(owner.files["safetensors"]), owner)
    assert from_pt.verdict is Verdict.DETECTED
    assert from_pt.to_dict() == from_st.to_dict()


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_onnx_export_is_detected_and_the_folding_shift_reported(owner: SimpleNamespace, dynamo: bool) -> None:
    """Eval-mode exports fold batch-norm: the legacy exporter (``dynamo=False``, default constant
    folding) renames the layers, torch 2.13's default exporter (dynamo) keeps the names."""
    path = owner.out / f"model-{'dynamo' if dynamo else 'legacy'}.onnx"
    options = {} if dynamo else {"dynamo": False}  # the dynamo exporter is the default: no argument
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(owner.model.eval(), (owner.data.test.tensors[0][:1],), str(path), **options)  # type: ignore[arg-type]
    finding = detect(load_model(path), owner)
    rows = finding.details["layers"]
    shown = {row["name"]: (row["suspect_name"], row["found_by"], row["rate"], row["rate_shift"]) for row in rows}
    print(f"\nONNX {'dynamo' if dynamo else 'legacy'}: {shown}")
    assert finding.verdict is Verdict.DETECTED
    for row in rows:
        assert row["found_by"] == ("by name" if dynamo else "by kind, shape and order")
        assert row["folded"] is True
        assert row["rate_shift"] == pytest.approx(row["rate"] - row["release_rate"])
        assert f"folding moved the rate by {row['rate_shift']:+.4f}" in row["note"]
        assert any(note.startswith(f"{row['name']}: looks batch-norm-folded") for note in finding.details["notes"])
    if not dynamo:
        assert {row["suspect_name"] for row in rows} == {f"/{row['name']}/Conv" for row in rows}
