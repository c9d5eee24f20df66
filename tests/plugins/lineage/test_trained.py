"""Trained models (slow): derived suspects get small p-values, independently trained ones do not, and a model
distilled into fresh weights is reported as not derived. The full measurement (30 independent models per
architecture and every derived suspect) is scripts/lineage_evidence.py; its figures are in docs/lineage.md."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from auditor.findings import Verdict
from auditor.plugin_manager import registered
from auditor.toolkit import data as datasets
from auditor.toolkit import models as zoo
from auditor.toolkit import training

pytestmark = pytest.mark.slow

RECIPE = {"cnn": training.TrainConfig(epochs=4, lr=1e-2), "vit": training.TrainConfig(epochs=8, lr=1e-3)}


def _trained(arch: str, seed: int, data: datasets.Dataset, model: nn.Module | None = None, **changes: Any) -> nn.Module:
    if model is None:
        torch.manual_seed(seed)
        model = zoo.TinyViT() if arch == "vit" else zoo.build(arch)
    training.train(model, data.train, dataclasses.replace(RECIPE[arch], seed=seed, **changes))
    return model.eval()


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory, save_model: Callable[..., Path], one_thread: None) -> Any:
    data = datasets.digits(split_seed=0)
    model = _trained("cnn", 0, data)
    folder = tmp_path_factory.mktemp("lineage_trained")
    return SimpleNamespace(data=data, model=model, path=save_model(model, folder / "reference.safetensors"),
                           folder=folder)  # fmt: skip


def _attack(attack_id: str, model: Path, out: Path, **options: Any) -> Path:
    registered("attacks")[attack_id].component.apply(model, out, options=options)  # type: ignore[attr-defined]
    return out


def test_heavy_fine_tuning_and_pruning_keep_the_lineage(
    owner: Any, audit: Callable[..., Any], lineage_of: Callable[[Any], Any]
) -> None:
    annealed = _attack(
        "fine-tune-anneal", owner.path, owner.folder / "anneal.safetensors", optimizer="adam", epochs=10, seed=1
    )
    pruned = _attack("prune-channels", owner.path, owner.folder / "pruned.safetensors", rate=0.25, seed=1)
    pruned_ft = _attack("fine-tune", pruned, owner.folder / "pruned_ft.safetensors", epochs=5, seed=1)
    for suspect in (annealed, pruned_ft):
        finding = lineage_of(audit(suspect, owner.path))
        assert finding.verdict is Verdict.DETECTED, (suspect.name, finding.summary)
        assert finding.metrics["layers_derived"] == finding.metrics["layers_tested"] == 3


def test_averaging_with_an_independent_model_keeps_the_lineage(
    owner: Any, save_model: Callable[..., Path], audit: Callable[..., Any], lineage_of: Callable[[Any], Any]
) -> None:
    other = _trained("cnn", 77, owner.data).state_dict()
    for share in (0.8, 0.5):
        mixed = {k: share * v + (1 - share) * other[k] if v.is_floating_point() else v
                 for k, v in owner.model.state_dict().items()}  # fmt: skip
        finding = lineage_of(audit(save_model(mixed, owner.folder / f"avg{share}.safetensors"), owner.path))
        assert finding.verdict is Verdict.DETECTED, (share, finding.summary)


def test_independent_and_distilled_models_are_not_derived(
    owner: Any, save_model: Callable[..., Path], audit: Callable[..., Any], lineage_of: Callable[[Any], Any]
) -> None:
    for seed in (101, 102):
        path = save_model(_trained("cnn", seed, owner.data), owner.folder / f"independent{seed}.safetensors")
        finding = lineage_of(audit(path, owner.path))
        assert finding.verdict is Verdict.NOT_DETECTED, (seed, finding.summary)
    images = owner.data.train.tensors[0]
    with torch.no_grad():
        labels = owner.model(images).argmax(dim=1)  # the thief labels its data with the reference's answers
    student = _trained("cnn", 99, SimpleNamespace(train=torch.utils.data.TensorDataset(images, labels)))
    finding = lineage_of(audit(save_model(student, owner.folder / "student.safetensors"), owner.path))
    assert finding.verdict is Verdict.NOT_DETECTED
    assert "does not prove it independent" in finding.summary


def test_the_transformer(
    tmp_path: Path, owner: Any, save_model: Callable[..., Path], audit: Callable[..., Any],
    lineage_of: Callable[[Any], Any],
) -> None:  # fmt: skip
    vit = _trained("vit", 0, owner.data)
    reference = save_model(vit, tmp_path / "vit.safetensors")
    tuned = _trained("vit", 3, owner.data, model=copy.deepcopy(vit), lr=0.05, optimizer="sgd", epochs=4)
    finding = lineage_of(audit(save_model(tuned, tmp_path / "tuned.safetensors"), reference))
    assert finding.verdict is Verdict.DETECTED and finding.metrics["layers_derived"] >= 10
    for seed in (201,):
        finding = lineage_of(audit(save_model(_trained("vit", seed, owner.data), tmp_path / "ind.safetensors"),
                                   reference))  # fmt: skip
        assert finding.verdict is Verdict.NOT_DETECTED
