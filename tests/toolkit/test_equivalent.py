"""toolkit.equivalent: branch and dummy-neuron edits keep the function of the built-in CNN and ResNet
(largest logit change within 1e-4) and change the structure the way they say."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from auditor.errors import UsageError
from auditor.toolkit import equivalent
from auditor.toolkit import models as zoo

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch: str) -> nn.Module:
    """A seeded built-in with batch-norm statistics away from 0/1, so that every edit is really exercised."""
    model = zoo.build(arch, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)  # type: ignore[union-attr]
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)  # type: ignore[union-attr]
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
    return model.eval()


EDITS: dict[str, Callable[[nn.Module], tuple[nn.Module, Any]]] = {
    "split_outputs": lambda m: equivalent.split_outputs(m, k=3),
    "split_inputs": lambda m: equivalent.split_inputs(m, k=2),
    "neuron_clique": lambda m: equivalent.neuron_clique(m, seed=1, dummies=5, group=3),
    "neuron_split": lambda m: equivalent.neuron_split(m, seed=1, units=3, parts=3),
}


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_each_edit_keeps_the_function(arch: str, edit: str) -> None:
    model = _model(arch)
    edited, info = EDITS[edit](model)
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        change = float((model(x) - edited.eval()(x)).abs().max())
    assert change <= 1e-4, (edit, info)
    before, after = model.state_dict(), edited.state_dict()
    assert before.keys() != after.keys() or any(before[k].shape != after[k].shape for k in before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched


def test_split_outputs_writes_branch_names_whose_rows_are_the_layers() -> None:
    model = _model("cnn")
    edited, names = equivalent.split_outputs(model, k=3, layers=["conv2", "head"])
    state = edited.state_dict()
    assert names == ["conv2", "head"]
    assert [state[f"conv2.{i}.weight"].shape[0] for i in range(3)] == [11, 11, 10]
    assert torch.equal(torch.cat([state[f"head.{i}.weight"] for i in range(3)]), model.state_dict()["head.weight"])
    assert "conv1.weight" in state and "conv2.weight" not in state


def test_split_inputs_keeps_the_bias_in_branch_zero() -> None:
    model = _model("resnet")
    edited, _ = equivalent.split_inputs(model, k=2, layers=["head"])
    state = edited.state_dict()
    merged = torch.cat([state["head.0.weight"], state["head.1.weight"]], 1)
    assert torch.equal(merged, model.state_dict()["head.weight"])
    assert torch.equal(state["head.0.bias"], model.state_dict()["head.bias"]) and "head.1.bias" not in state


def test_clique_members_share_a_fan_in_and_cancel() -> None:
    model = _model("cnn")
    edited, added = equivalent.neuron_clique(model, seed=4, layers=["conv2"], dummies=4, group=2)
    state = edited.state_dict()
    assert added == {"conv2": 4}
    rows, cols = state["conv2.weight"][32:], state["conv3.weight"][:, 32:]
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[2], rows[3]) and not torch.equal(rows[0], rows[2])
    assert float((cols[:, 0] + cols[:, 1]).abs().max()) < 1e-6 < float(cols[:, 0].abs().max())


def test_split_units_are_positive_multiples() -> None:
    model = _model("cnn")
    edited, added = equivalent.neuron_split(model, seed=4, layers=["conv1"], units=2, parts=2)
    w = edited.state_dict()["conv1.weight"].flatten(1)
    assert added == {"conv1": 2}
    original = model.state_dict()["conv1.weight"].flatten(1)
    for copy in w[16:]:
        unit = int((nn.functional.cosine_similarity(original, copy[None]) > 1 - 1e-6).nonzero())
        ratio = copy / original[unit]
        assert float(ratio.min()) > 0 and float(ratio.max() - ratio.min()) < 1e-5


def test_impossible_requests_are_usage_errors() -> None:
    model = _model("cnn")
    with pytest.raises(UsageError, match="at least 2 branches"):
        equivalent.split_outputs(model, k=1)
    with pytest.raises(UsageError, match="cannot split into 2 input groups conv1"):
        equivalent.split_inputs(model, layers=["conv1"])  # one input channel
    with pytest.raises(UsageError, match="hidden layers .*conv1, conv2, conv3"):
        equivalent.neuron_clique(model, seed=0, layers=["head"])
