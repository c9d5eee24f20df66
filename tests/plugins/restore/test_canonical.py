"""The canonical-form restorer against ``factor-linear``: every layer of the Greedy Residuals owner's
SmallCNN factored into ``Q^T W`` then ``Q`` (``Q`` random orthogonal), published as safetensors (the
factored names show the chain, the edges are inferred) or ONNX (a real graph, batch-norm folded into the
1x1 convolution). Restore must fuse it back and the detector find the watermark; an innocent model
factored the same way must be left alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from auditor.audit.detect import run_detectors
from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.findings import Verdict
from auditor.plugin_manager import registered
from auditor.plugins.attacks.structure import FactorLinear
from auditor.plugins.restore import guard
from auditor.plugins.restore.plugin import CanonicalRestorer, ChannelRestorer, FoldRestorer, ScaleRestorer
from auditor.toolkit import edits
from auditor.toolkit import models as zoo

pytestmark = pytest.mark.usefixtures("one_thread")

REST = (ChannelRestorer(), FoldRestorer(), ScaleRestorer())


@pytest.fixture
def canonical_on() -> None:
    """``restore-canonical`` is among the audit's (default) restorers."""
    assert "restore-canonical" in registered("restorers")


def factor(model: Path, out: Path, **options: Any) -> dict[str, Any]:
    return FactorLinear().apply(model, out, options={"seed": 3, **options})


def test_factoring_keeps_the_function(gr_owner: SimpleNamespace) -> None:
    factored, names = edits.factor_linear(gr_owner.model, seed=3)
    x = gr_owner.data.test.tensors[0]
    with torch.no_grad():
        change = float((gr_owner.model(x) - factored.eval()(x)).abs().max())
    assert names == ["conv1", "conv2", "conv3", "head"]
    assert change < 1e-4
    state = factored.state_dict()
    q = state["conv2.1.weight"].flatten(1).double()
    assert torch.allclose(q @ q.T, torch.eye(32, dtype=torch.float64), atol=1e-5)  # orthogonal, not a permutation
    assert (q.abs() < 0.9).all()


def test_factor_linear_attack_writes_and_checks(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    summary = factor(gr_owner.files["safetensors"], tmp_path / "f.safetensors", layers="conv2, head")
    assert summary["factored"] == ["conv2", "head"] and summary["max_output_change"] < 1e-4
    assert {"conv2.0.weight", "conv2.1.weight", "head.0.weight", "head.1.bias", "conv3.weight"} <= set(
        load_file(tmp_path / "f.safetensors")
    )


def test_fusion_gives_back_the_owners_weights(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    factor(gr_owner.files["safetensors"], tmp_path / "f.safetensors")
    suspect, reference = load_model(tmp_path / "f.safetensors"), load_model(gr_owner.files["safetensors"])
    fused, log = CanonicalRestorer().restore(suspect, reference)
    assert log["acted"] and log["evidence"]["derived"]
    assert [(f["first"], f["second"], f["name"]) for f in log["fusions"]] == [
        ("conv1.0", "conv1.1", "conv1"), ("conv2.0", "conv2.1", "conv2"),
        ("conv3.0", "conv3.1", "conv3"), ("head.0", "head.1", "head"),
    ]  # fmt: skip
    assert all(f["residual"] < 1e-6 and "names say" in f["edges"] for f in log["fusions"])
    for name in ("conv2", "conv3"):
        owner = gr_owner.model.state_dict()[f"{name}.weight"]
        assert torch.allclose(fused.layer(name).params["weight"].read(), owner, atol=1e-5)
    assert [x.name for x in suspect.layers if x.name.startswith("conv")][:2] == ["conv1.0", "conv1.1"]  # untouched


def verdict(graph: Any, owner: SimpleNamespace, restorers: tuple[Any, ...]) -> Verdict:
    restored, _ = run_restorers(graph, load_model(owner.files["safetensors"]), restorers=restorers)
    (finding,) = run_detectors(restored, bundles=[owner.bundle])
    return finding.verdict


@pytest.mark.usefixtures("canonical_on")
@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_factored_copy_is_detected_only_after_fusion(
    gr_owner: SimpleNamespace, tmp_path: Path, suffix: str, run_cli: Callable[..., Any]
) -> None:
    suspect = tmp_path / f"factored{suffix}"
    factor(gr_owner.files["safetensors"], suspect)
    graph = load_model(suspect)
    assert verdict(graph, gr_owner, REST) is not Verdict.DETECTED
    assert verdict(graph, gr_owner, (CanonicalRestorer(), *REST)) is Verdict.DETECTED
    bundle, reference = gr_owner.out / "owner_bundle.json", gr_owner.files["safetensors"]
    code, stdout, stderr = run_cli("audit", suspect, "--bundle", bundle, "--reference", reference,
                                   "--out", tmp_path / "r.json")  # fmt: skip
    assert code == 0, stdout + stderr


def innocent_log(path: Path, gr_owner: SimpleNamespace, **kwargs: Any) -> dict[str, Any]:
    return CanonicalRestorer(**kwargs).restore(load_model(path), load_model(gr_owner.files["safetensors"]))[1]


@pytest.mark.usefixtures("canonical_on")
def test_innocent_factored_model_is_left_alone(
    gr_owner: SimpleNamespace, tmp_path: Path, clean_model: Callable[..., Path], run_cli: Callable[..., Any]
) -> None:
    factor(clean_model(tmp_path / "clean.safetensors", seed=1), tmp_path / "innocent.safetensors")
    log = innocent_log(tmp_path / "innocent.safetensors", gr_owner)
    assert not log["acted"] and len(log["fusions"]) == 4
    assert log["evidence"]["score"] < guard.THRESHOLD and log["reason"].startswith("left alone")
    assert innocent_log(tmp_path / "innocent.safetensors", gr_owner, guard=False)["acted"]  # the guard decides
    code, _, _ = run_cli("audit", tmp_path / "innocent.safetensors", "--bundle", gr_owner.out / "owner_bundle.json",
                         "--reference", gr_owner.files["safetensors"], "--out", tmp_path / "r.json")  # fmt: skip
    assert code != 0


@pytest.mark.slow
def test_trained_innocent_factored_is_never_claimed(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from auditor.toolkit import training

    model = zoo.build("cnn", seed=7)
    training.train(model, gr_owner.data.train, training.TrainConfig(epochs=4, lr=1e-2, seed=7))
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "trained.safetensors"))
    for suffix in (".safetensors", ".onnx"):
        out = tmp_path / f"innocent{suffix}"
        factor(tmp_path / "trained.safetensors", out)
        log = innocent_log(out, gr_owner)
        assert not log["acted"] and log["evidence"]["score"] < guard.THRESHOLD, log["evidence"]
        assert verdict(load_model(out), gr_owner, (CanonicalRestorer(), *REST)) is not Verdict.DETECTED
