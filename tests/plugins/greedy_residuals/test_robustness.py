"""Greedy Residuals detector against removal attacks on a watermarked SmallCNN (digits, fixed seeds).

The owner's model is trained once per module. Each attack works on a copy,
saves it with the project's own writer and is audited from the file, as a
suspect would be. Measured numbers are printed (``pytest -s``) for the docs.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from auditor.audit.load import load_model
from auditor.findings import Finding, Verdict
from auditor.plugins.greedy_residuals.detector import GreedyResidualsDetector
from auditor.toolkit import data as datasets
from auditor.toolkit import models as zoo
from auditor.toolkit import training

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def owner(gr_owner: SimpleNamespace) -> SimpleNamespace:
    return gr_owner


_counter = iter(range(1_000_000))


def audit(model: nn.Module, owner: SimpleNamespace) -> Finding:
    """Save ``model`` as a suspect file, load it as auditor would, and detect."""
    files = training.save_model(model, owner.out / "suspects", f"suspect{next(_counter)}")
    (finding,) = GreedyResidualsDetector().detect(load_model(files["safetensors"]), bundle=owner.bundle, context={})
    return finding


def rates(finding: Finding) -> dict[str, float]:
    """Detection rate (matches, or inverted matches) per marked layer."""
    return {row["name"]: row["detection_rate"] for row in finding.details["layers"]}


@torch.no_grad()
def outputs(model: nn.Module, owner: SimpleNamespace) -> torch.Tensor:
    model.eval()
    return model(owner.data.test.tensors[0])


def test_owner_model_is_watermarked(owner: SimpleNamespace) -> None:
    finding = audit(owner.model, owner)
    print(f"\nowner: accuracy {owner.accuracy:.3f}, rates {rates(finding)}")
    assert owner.accuracy > 0.9
    assert finding.verdict is Verdict.DETECTED
    assert all(r >= 0.95 for r in rates(finding).values())
    assert [row["name"] for row in finding.details["layers"]] == [layer.name for layer in owner.wm.layers]
    assert {row["found_by"] for row in finding.details["layers"]} == {"by name"}


def test_fine_tuning_with_a_new_head_on_another_split(owner: SimpleNamespace) -> None:
    model = copy.deepcopy(owner.model)
    torch.manual_seed(11)
    model.head = nn.Linear(model.head.in_features, 10)  # transfer learning replaces the output layer
    attacker_train, _ = datasets.split(datasets.digits(split_seed=1), 0.5, seed=7)
    training.train(model, attacker_train, training.TrainConfig(epochs=10, lr=1e-3, seed=11))
    accuracy = training.evaluate(model, owner.data.test)
    finding = audit(model, owner)
    print(
        f"\nfine-tune (all layers, new head, 10 epochs on half of another split): acc {accuracy:.3f}, {rates(finding)}"
    )
    assert accuracy > 0.8  # a usable model: the attack did real training
    assert finding.verdict is Verdict.DETECTED
    assert all(r >= 0.95 for r in rates(finding).values())


def _prune(model: nn.Module, fraction: float, names: list[str]) -> nn.Module:
    """Zero the ``fraction`` smallest-|w| weights of each named layer (per-layer magnitude pruning)."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            w = pruned.get_parameter(name)
            cut = torch.quantile(w.abs().flatten(), fraction)
            w[w.abs() <= cut] = 0.0
    return pruned


def test_pruning_half_of_each_marked_layer(owner: SimpleNamespace) -> None:
    marked = owner.wm.layer_names
    model = _prune(owner.model, 0.5, marked)
    finding = audit(model, owner)
    accuracy = training.evaluate(model, owner.data.test)
    deep = rates(audit(_prune(owner.model, 0.9, marked), owner))
    print(f"\nprune 50% per marked layer: acc {accuracy:.3f}, {rates(finding)}; 90%: {deep}")
    assert finding.verdict is Verdict.DETECTED
    assert all(r >= 0.95 for r in rates(finding).values())


def _rescale(model: zoo.SmallCNN, out_factors: torch.Tensor, in_factors: torch.Tensor) -> zoo.SmallCNN:
    """conv2's output channels times ``out_factors`` and conv3's input channels divided by
    ``in_factors`` (all > 0), with bn2 adjusted so that the function is unchanged."""
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        # conv2 -> bn2: scale bn2's statistics with the channels, so that
        # (s y - s mean) / sqrt(s^2 (var + eps)) is the original normalised value.
        bn, s = scaled.bn2, out_factors
        mean, var = bn.running_mean, bn.running_var
        assert mean is not None and var is not None
        scaled.conv2.weight.mul_(s[:, None, None, None])
        mean.mul_(s)
        var.copy_(s**2 * (var + bn.eps) - bn.eps)
        # bn2 -> ReLU -> max-pool -> conv3: relu(c z) = c relu(z) and max-pool commutes with c > 0,
        # so bn2's output times c and conv3's input channels divided by c is the same function.
        bn.weight.mul_(in_factors)
        bn.bias.mul_(in_factors)
        scaled.conv3.weight.div_(in_factors[None, :, None, None])
    return scaled


def test_uniform_positive_rescaling_keeps_every_bit(owner: SimpleNamespace) -> None:
    model = _rescale(owner.model, torch.full((32,), 3.0), torch.full((32,), 0.25))
    assert torch.allclose(outputs(model, owner), outputs(owner.model, owner), atol=1e-4)
    before, after = audit(owner.model, owner), audit(model, owner)
    assert after.verdict is Verdict.DETECTED
    assert [r["k"] for r in after.details["layers"]] == [r["k"] for r in before.details["layers"]]


def test_per_channel_positive_rescaling(owner: SimpleNamespace) -> None:
    gen = torch.Generator().manual_seed(3)
    out_factors = torch.empty(32).uniform_(0.5, 2.0, generator=gen)
    in_factors = torch.empty(32).uniform_(0.5, 2.0, generator=gen)
    model = _rescale(owner.model, out_factors, in_factors)
    assert torch.allclose(outputs(model, owner), outputs(owner.model, owner), atol=1e-4)
    before, after = audit(owner.model, owner), audit(model, owner)
    print(f"\nper-channel rescaling in [0.5, 2] (conv2 out, conv3 in): {rates(before)} -> {rates(after)}")
    # Unequal factors change which pooled cells are the largest in a row, so a bit whose
    # residual sat near its margin can flip: detection stays, every bit is not guaranteed.
    assert after.verdict is Verdict.DETECTED
    assert all(r >= 0.95 for r in rates(after).values())


def test_negation_with_batch_norm_is_detected_and_inverted(owner: SimpleNamespace) -> None:
    model = copy.deepcopy(owner.model)
    with torch.no_grad():
        # bn(-y) with gamma and running_mean negated: -gamma (-y + mean) / s + beta = gamma (y - mean) / s + beta.
        model.conv2.weight.neg_()
        model.bn2.weight.neg_()
        model.bn2.running_mean.neg_()
    assert torch.allclose(outputs(model, owner), outputs(owner.model, owner), atol=1e-4)
    finding = audit(model, owner)
    rows = {row["name"]: row for row in finding.details["layers"]}
    print(f"\nnegated conv2+bn2: k={rows['conv2']['k']}, inverted={rows['conv2']['inverted']}")
    assert finding.verdict is Verdict.DETECTED
    assert rows["conv2"]["inverted"] is True and rows["conv2"]["detection_rate"] >= 0.95
    assert "negated" in rows["conv2"]["note"]
    assert rows["conv3"]["inverted"] is False
