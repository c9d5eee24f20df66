"""The lineage detector through the real pipeline: what it tests, what it answers, and when it says nothing.

Untrained models are the null exactly (independently initialised); a reference plus noise stands for a
fine-tuned copy. Trained models are in test_trained.py (slow)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from auditor.errors import UsageError
from auditor.findings import Verdict
from auditor.plugin_manager import registered
from auditor.plugins.lineage.detector import DEFAULT_PERMUTATIONS, LineageDetector, layers_to_test
from auditor.toolkit import models as zoo
from auditor.toolkit.models import model_graph


def _noisy(model: torch.nn.Module, scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.dim() > 1 else v
        for k, v in model.state_dict().items()
    }  # fmt: skip


@pytest.fixture(scope="module")
def cnn_reference(tmp_path_factory: pytest.TempPathFactory, save_model: Callable[..., Path]) -> Path:
    return save_model(zoo.build("cnn", seed=0), tmp_path_factory.mktemp("lineage") / "reference.safetensors")


def test_it_is_registered_as_a_bundle_free_check_with_its_own_question() -> None:
    detector = registered("detectors")["lineage"].component
    assert isinstance(detector, LineageDetector)
    assert detector.scheme == ""
    assert detector.evidence == "derived from the reference"
    assert [p.name for p in detector.params] == ["alpha", "permutations", "seed"]


def test_without_a_reference_it_says_nothing(
    cnn_reference: Path, audit: Callable[..., Any], lineage_of: Callable[[Any], Any]
) -> None:
    record = audit(cnn_reference, None)
    assert [f for f in record.findings if f.detector == "lineage"] == []


def test_the_reference_itself_is_derived_in_every_tested_layer(
    cnn_reference: Path, audit: Callable[..., Any], lineage_of: Callable[[Any], Any]
) -> None:
    finding = lineage_of(audit(cnn_reference, cnn_reference))
    assert finding.verdict is Verdict.DETECTED
    assert [r["name"] for r in finding.details["layers"]] == ["conv1", "conv2", "conv3"]
    assert all(r["derived"] and r["reached"] == 0 for r in finding.details["layers"])
    assert finding.metrics["p"] == pytest.approx(3 / (DEFAULT_PERMUTATIONS + 1))
    assert finding.details["untested"] == [{"name": "head", "why": "an output layer: its units are the task's outputs"}]
    assert finding.scheme == "" and finding.bundle == ""


def test_a_noisy_copy_is_derived_and_an_independent_model_is_not(
    tmp_path: Path, cnn_reference: Path, save_model: Callable[..., Path], audit: Callable[..., Any],
    lineage_of: Callable[[Any], Any],
) -> None:  # fmt: skip
    reference = zoo.build("cnn", seed=0)
    noisy = save_model(_noisy(reference, 1.0, seed=5), tmp_path / "noisy.safetensors")  # |cos| about 0.7
    found = lineage_of(audit(noisy, cnn_reference))
    assert found.verdict is Verdict.DETECTED
    assert found.metrics["layers_derived"] == 3
    innocent = save_model(zoo.build("cnn", seed=9), tmp_path / "innocent.safetensors")
    record = audit(innocent, cnn_reference)
    finding = lineage_of(record)
    assert finding.verdict is Verdict.NOT_DETECTED
    assert finding.metrics["p"] > 0.01
    assert finding.metrics["restored"] is False  # the restore guard left the innocent alone
    assert "not prove it independent" in finding.summary


def test_kept_layers_are_named_and_retrained_ones_are_not(
    tmp_path: Path, cnn_reference: Path, save_model: Callable[..., Path], audit: Callable[..., Any],
    lineage_of: Callable[[Any], Any],
) -> None:  # fmt: skip
    reference, fresh = zoo.build("cnn", seed=0).state_dict(), zoo.build("cnn", seed=11).state_dict()
    kept = {k: (reference[k] if k.startswith(("conv1.", "bn1.", "conv2.", "bn2.")) else fresh[k]) for k in reference}
    finding = lineage_of(audit(save_model(kept, tmp_path / "kept.safetensors"), cnn_reference))
    assert finding.verdict is Verdict.DETECTED
    assert {r["name"]: r["derived"] for r in finding.details["layers"]} == {
        "conv1": True, "conv2": True, "conv3": False,
    }  # fmt: skip
    assert "not derived: conv3" in finding.summary


def test_a_permuted_copy_is_found_after_restore(
    tmp_path: Path, cnn_reference: Path, audit: Callable[..., Any], lineage_of: Callable[[Any], Any]
) -> None:
    attack = registered("attacks")["permute"].component
    permuted = tmp_path / "permuted.safetensors"
    attack.apply(cnn_reference, permuted, options={"seed": 3})  # type: ignore[attr-defined]
    # as given, the units are out of order: compared in place, nothing matches
    as_given = LineageDetector().detect(
        _graph(permuted), bundle=None, context={"reference": _graph(cnn_reference), "options": {}}
    )[0]
    assert as_given.verdict is Verdict.NOT_DETECTED
    finding = lineage_of(audit(permuted, cnn_reference))
    assert finding.verdict is Verdict.DETECTED
    assert finding.metrics["restored"] is True
    assert finding.metrics["layers_derived"] == 3


def _graph(path: Path) -> Any:
    from auditor.audit.load import load_model

    return load_model(path)


def test_independently_initialised_models_are_called_derived_at_most_at_the_level(
    cnn_reference: Path,
) -> None:
    # The null exactly: 60 independently initialised CNNs against one reference. At alpha 0.1 (Bonferroni over
    # three layers) the expected count is at most 6; more than 14 has probability below 0.001.
    detector, reference = LineageDetector(), _graph(cnn_reference)
    called = 0
    for seed in range(100, 160):
        finding = detector.detect(model_graph(zoo.build("cnn", seed=seed)), bundle=None, context={
            "reference": reference, "options": {"alpha": 0.1, "permutations": 199}})[0]  # fmt: skip
        called += finding.verdict is Verdict.DETECTED
    assert called <= 14


def test_layers_of_another_shape_are_untested_and_none_at_all_is_inconclusive() -> None:
    wide = model_graph(zoo.build("cnn", seed=0, width=3))  # no layer of the reference's shapes
    finding = LineageDetector().detect(
        wide, bundle=None, context={"reference": model_graph(zoo.build("cnn", seed=0)), "options": {}}
    )[0]
    assert finding.verdict is Verdict.INCONCLUSIVE
    assert finding.metrics["p"] is None and finding.metrics["layers_tested"] == 0
    assert {u["name"] for u in finding.details["untested"]} == {"conv1", "conv2", "conv3", "head"}
    assert "untested" in finding.summary


def test_options_are_checked_and_change_the_resolution() -> None:
    reference = model_graph(zoo.build("cnn", seed=0))
    detector = LineageDetector()
    finding = detector.detect(reference, bundle=None, context={
        "reference": reference, "options": {"permutations": 99}})[0]  # fmt: skip
    assert finding.metrics["p"] == pytest.approx(3 / 100)
    # 0.03 > 0.01: a hundred re-orderings cannot show more, so even the reference itself is untested, not "no"
    assert finding.verdict is Verdict.INCONCLUSIVE
    assert "raise the lineage.permutations option" in finding.summary
    enough = detector.detect(reference, bundle=None, context={
        "reference": reference, "options": {"permutations": 99, "alpha": 0.05}})[0]  # fmt: skip
    assert enough.verdict is Verdict.DETECTED
    with pytest.raises(UsageError, match="lineage: option permutations must be an integer between 99"):
        detector.options({"permutations": 5})
    with pytest.raises(UsageError, match="lineage has no option 'n'"):
        detector.options({"n": 5})


def test_same_inputs_same_finding_and_the_seed_is_recorded() -> None:
    reference, suspect = model_graph(zoo.build("cnn", seed=0)), model_graph(zoo.build("cnn", seed=1))
    context = {"reference": reference, "options": {"permutations": 199, "seed": 4}}
    first = LineageDetector().detect(suspect, bundle=None, context=context)[0].to_dict()
    assert LineageDetector().detect(suspect, bundle=None, context=context)[0].to_dict() == first
    assert first["metrics"]["seed"] == 4
    other = LineageDetector().detect(suspect, bundle=None, context=context | {"options": {"permutations": 199}})
    assert other[0].to_dict()["details"] != first["details"]  # another draw of re-orderings


def test_the_transformer_is_tested_layer_by_layer() -> None:
    torch.manual_seed(0)
    vit = zoo.TinyViT()
    tested, left_out = layers_to_test(model_graph(vit))
    assert len(tested) == 13 and {u["name"] for u in left_out} == {"head"}
    torch.manual_seed(1)
    other = model_graph(zoo.TinyViT())
    finding = LineageDetector().detect(other, bundle=None, context={"reference": model_graph(vit), "options": {}})[0]
    assert finding.verdict is Verdict.NOT_DETECTED


def test_a_layer_past_the_memory_bound_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from auditor.plugins.lineage import detector as module

    monkeypatch.setattr(module, "MAX_UNITS", 20)  # conv1 has 16 units, conv2 32, conv3 64
    tested, left_out = layers_to_test(model_graph(zoo.build("cnn", seed=0)))
    assert [layer.name for layer in tested] == ["conv1"]
    assert {u["name"]: u["why"] for u in left_out}["conv3"] == "more than 20 units (the test's memory bound)"
