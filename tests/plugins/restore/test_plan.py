"""The restore plan is made once per suspect graph and shared by the three restorers, through a real audit.

``make_plan`` is wrapped to count its calls (the real one still runs). A restorer
that changes nothing hands the next one the same graph, so an untouched copy
and an innocent model are planned once, not three times; a permuted copy is
planned twice: as it came, and once more after its channels were put back (the
fold and scale restorers' guards measure that restored graph, and share its plan).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from auditor.audit.pipeline import audit_suspect, load_inputs
from auditor.bases import Restorer
from auditor.graph import LayerGraph
from auditor.plugin_manager import components
from auditor.plugins.restore import plan as plan_module
from auditor.toolkit import models


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _permuted(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """conv1's output channels (and bn1's, and conv2's inputs) in a random order: the same function."""
    assert isinstance(model, models.SmallCNN)
    order = torch.randperm(model.conv1.out_channels, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.conv1.weight.copy_(model.conv1.weight[order])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(model.bn1, name).copy_(getattr(model.bn1, name)[order])
        model.conv2.weight.copy_(model.conv2.weight[:, order])
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("plan")
    return {
        "reference": _save(models.build("cnn", seed=0), out / "reference.safetensors"),
        "copy": _save(models.build("cnn", seed=0), out / "copy.safetensors"),
        "permuted": _save(_permuted(models.build("cnn", seed=0), seed=1), out / "permuted.safetensors"),
        "innocent": _save(models.build("cnn", seed=1), out / "innocent.safetensors"),
    }


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> list[LayerGraph]:
    """The suspect graphs ``make_plan`` was called with, in order."""
    made: list[LayerGraph] = []
    real: Callable[..., Any] = plan_module.make_plan

    def counting(suspect: LayerGraph, reference: LayerGraph, **kwargs: Any) -> Any:
        made.append(suspect)
        return real(suspect, reference, **kwargs)

    monkeypatch.setattr(plan_module, "make_plan", counting)
    return made


def _planned_alone(suspect: LayerGraph, reference: LayerGraph) -> list[dict[str, Any]]:
    """The restore log when every restorer plans for itself: each gets a new graph object (same layers)."""
    entries = []
    graph = suspect
    for restorer in sorted(components("restorers", Restorer), key=lambda r: (r.order, r.id)):
        graph, log = restorer.restore(dataclasses.replace(graph), reference)
        entries.append({"restorer": restorer.id, "order": restorer.order, "status": "ok", "log": log})
    return entries


@pytest.mark.parametrize(("suspect", "expected"), [("copy", 1), ("innocent", 1), ("permuted", 2)])
def test_the_plan_is_made_once_per_suspect_graph(
    files: dict[str, Path], plans: list[LayerGraph], suspect: str, expected: int
) -> None:
    inputs = load_inputs(bundles=[], reference=files["reference"])
    assert inputs.reference is not None
    record = audit_suspect(files[suspect], inputs)
    assert [e["restorer"] for e in record.restore] == [
        "restore-transformer",
        "restore-canonical",
        "restore-branches",
        "restore-dummies",
        "restore-basis",
        "restore-channels",
        "restore-fold",
        "restore-scale",
    ]
    assert len(plans) == expected, [e["log"].get("reason") for e in record.restore]
    assert plans[0] is not inputs.reference.graph
    acted = [e["log"]["acted"] for e in record.restore]
    assert acted == ([False, False, False, False, False, True, False, False] if suspect == "permuted" else [False] * 8)
    # The log is what it was when each restorer made its own plan.
    plans.clear()
    assert record.restore == _planned_alone(record.graph, inputs.reference.graph)
    assert len(plans) == 3
