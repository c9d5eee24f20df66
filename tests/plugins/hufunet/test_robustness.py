"""HufuNet against removal (paper Tables 2-3, at digits scale): fine-tuning with EPH unfrozen,
magnitude pruning, and where the watermark breaks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from auditor.findings import Verdict
from auditor.plugins.hufunet.detector import TAU_ACC, audit_bundle
from auditor.toolkit import models as zoo
from auditor.toolkit import training
from auditor.toolkit.models import model_graph


def _stolen(owner: SimpleNamespace) -> torch.nn.Module:
    model = zoo.build("cnn", width=2)
    model.load_state_dict(load_file(owner.model_file))
    return model


def _prune(model: torch.nn.Module, rate: float) -> torch.nn.Module:
    """Magnitude pruning of every convolution weight, per layer: the smallest ``rate`` set to zero."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                k = int(rate * p.numel())
                if k:
                    p[p.abs() <= p.abs().flatten().kthvalue(k).values] = 0.0
    return model


def test_fine_tuning_all_layers_keeps_diffacc_below_tau(hufunet_owner: SimpleNamespace, one_thread: None) -> None:
    model = _stolen(hufunet_owner)
    before = [p.detach().clone() for p in model.parameters()]
    training.train(model, hufunet_owner.data.train, training.TrainConfig(epochs=5, lr=1e-3, seed=7))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # EPH moved too
    finding = audit_bundle(model_graph(model), hufunet_owner.bundle, {})
    assert finding.metrics["bit_identical_fraction"] < 0.01
    assert finding.metrics["diff_acc"] < TAU_ACC
    assert finding.verdict is Verdict.DETECTED, finding.summary


def test_large_learning_rate_fine_tuning_is_where_it_breaks(hufunet_owner: SimpleNamespace, one_thread: None) -> None:
    """The attack the paper cites (a large rate, then anneal) moves the weights far enough to
    erase HufuNet; the detector then says not found, never a false 'found'."""
    model = _stolen(hufunet_owner)
    config = training.TrainConfig(epochs=5, lr=5e-2, seed=7, schedule="cosine")
    training.train(model, hufunet_owner.data.train, config)
    finding = audit_bundle(model_graph(model), hufunet_owner.bundle, {})
    assert finding.metrics["diff_acc"] >= TAU_ACC
    assert finding.verdict is Verdict.NOT_DETECTED


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_magnitude_pruning_up_to_half_keeps_diffacc_below_tau(hufunet_owner: SimpleNamespace, rate: float) -> None:
    model = _prune(_stolen(hufunet_owner), rate)
    finding = audit_bundle(model_graph(model), hufunet_owner.bundle, {})
    assert finding.metrics["diff_acc"] < TAU_ACC
    assert finding.metrics["bit_identical_fraction"] < 1.0  # some EPH weights were pruned
    assert finding.verdict is Verdict.DETECTED, finding.summary


def test_pruning_costs_the_thief_first(hufunet_owner: SimpleNamespace) -> None:
    """Paper Table 3's pattern: the host's accuracy collapses before HufuNet's does."""
    for rate in (0.8, 0.9):
        model = _prune(_stolen(hufunet_owner), rate)
        host = training.evaluate(model, hufunet_owner.data.test)
        finding = audit_bundle(model_graph(model), hufunet_owner.bundle, {})
        assert host < 0.5
        assert finding.metrics["acc_combined"] > host
