"""The integrity guard: restore never makes an independently trained model look like the owner's.

Ten SmallCNNs are trained independently of the owner's (other initialisation,
other shuffling, other train/test split; two epochs each, which is enough
for a working digits model) and audited against the watermarked owner model
of ``gr_owner``. With the guard, every restorer leaves them untouched and
says why. Without it, restore does what it is built to do, find the reading
of the suspect closest to the reference, and that alone raises their Greedy
Residuals match rates, far enough for false ownership claims: the reason the
guard exists.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.findings import Finding, Verdict
from auditor.formats.statedict import graph_from_tensors
from auditor.graph import LayerGraph, TensorRef
from auditor.plugin_manager import registered
from auditor.plugins.greedy_residuals.detector import GreedyResidualsDetector
from auditor.plugins.restore import guard
from auditor.plugins.restore.plugin import ChannelRestorer, FoldRestorer, ScaleRestorer
from auditor.toolkit import data as datasets
from auditor.toolkit import edits as attacks
from auditor.toolkit import models as zoo
from auditor.toolkit import training
from auditor.toolkit.channels import tensors_of

pytestmark = pytest.mark.usefixtures("one_thread")

INNOCENTS = 10


@pytest.fixture(scope="module")
def innocents(tmp_path_factory: pytest.TempPathFactory) -> list[LayerGraph]:
    out = tmp_path_factory.mktemp("innocents")
    graphs = []
    for i in range(INNOCENTS):
        model = zoo.build("cnn", seed=100 + i)
        data = datasets.digits(split_seed=i + 1)
        training.train(model, data.train, training.TrainConfig(epochs=2, lr=1e-2, seed=100 + i))
        assert training.evaluate(model, data.test) > 0.9  # a real model, not noise
        files = training.save_model(model.eval(), out, f"innocent{i}")
        graphs.append(load_model(files["safetensors"]))
    return graphs


@pytest.fixture(scope="module")
def reference(gr_owner: SimpleNamespace) -> LayerGraph:
    return load_model(gr_owner.files["safetensors"])


def finding(graph: LayerGraph, owner: SimpleNamespace) -> Finding:
    (result,) = GreedyResidualsDetector().detect(graph, bundle=owner.bundle, context={})
    return result


def rates(graph: LayerGraph, owner: SimpleNamespace) -> list[float]:
    return [row["rate"] for row in finding(graph, owner).details["layers"]]


def test_the_restorers_are_registered_in_order() -> None:
    found = {cid: r for cid, r in registered("restorers").items() if r.plugin == "auditor.plugins.restore.plugin"}
    assert sorted(found, key=lambda cid: found[cid].component.order) == [
        "restore-transformer", "restore-canonical", "restore-branches", "restore-dummies", "restore-basis",
        "restore-channels", "restore-fold", "restore-scale",
    ]  # fmt: skip


def test_innocent_models_are_never_claimed(
    innocents: list[LayerGraph], reference: LayerGraph, gr_owner: SimpleNamespace
) -> None:
    scores = []
    for suspect in innocents:
        restored, log = run_restorers(suspect, reference)  # the registered restorers, as an audit runs them
        structural = ("restore-transformer", "restore-canonical", "restore-branches", "restore-dummies",
                      "restore-basis")  # not a transformer; nothing to fuse,
        # merge, remove or align: they say so, not the guard
        assert [e["log"]["acted"] for e in log if e["restorer"] in structural] == [False] * len(structural)
        ours = [e for e in log if e["restorer"].startswith("restore-") and e["restorer"] not in structural]
        assert [e["status"] for e in ours] == ["ok", "ok", "ok"]
        assert not any(e["log"]["acted"] for e in ours)
        assert all(e["log"]["reason"].startswith("left alone: not demonstrably derived") for e in ours)
        assert restored is suspect
        assert finding(restored, gr_owner).verdict is Verdict.NOT_DETECTED
        evidence = ours[0]["log"]["evidence"]
        assert not evidence["derived"] and "conv1" in evidence["not_counted"]  # 3x3x1 rows prove nothing
        scores.append(evidence["score"])
    print(f"\ninnocent guard scores: max {max(scores):.4f}, mean {statistics.mean(scores):.4f}")
    assert max(scores) < guard.THRESHOLD / 2  # far below, not just below


def test_without_the_guard_restore_would_raise_innocent_match_rates(
    innocents: list[LayerGraph], reference: LayerGraph, gr_owner: SimpleNamespace
) -> None:
    unguarded = [ChannelRestorer(guard=False), FoldRestorer(guard=False), ScaleRestorer(guard=False)]
    guarded = [ChannelRestorer(), FoldRestorer(), ScaleRestorer()]
    before, without, with_guard = [], [], []
    claimed = 0
    for suspect in innocents:
        before += rates(suspect, gr_owner)
        forced, log = run_restorers(suspect, reference, restorers=unguarded)
        assert log[0]["log"]["acted"] and log[0]["log"]["guard"] == "off"
        without += rates(forced, gr_owner)
        claimed += finding(forced, gr_owner).verdict is Verdict.DETECTED
        kept, _ = run_restorers(suspect, reference, restorers=guarded)
        with_guard += rates(kept, gr_owner)
    print(
        f"\nmean innocent match rate: {statistics.mean(before):.4f} as trained, "
        f"{statistics.mean(without):.4f} restored without the guard, {claimed} of {INNOCENTS} then claimed"
    )
    assert statistics.mean(without) > statistics.mean(before) + 0.03
    assert sum(w > b for w, b in zip(without, before, strict=True)) > 0.75 * len(before)
    assert claimed >= 1  # not only higher rates: false ownership claims
    assert with_guard == before


def test_a_derived_model_passes_the_guard(
    gr_owner: SimpleNamespace, reference: LayerGraph, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = copy.deepcopy(gr_owner.model).train()
    theirs, _ = datasets.split(datasets.digits(split_seed=1), 0.5, seed=7)
    training.train(model, theirs, training.TrainConfig(epochs=5, lr=1e-3, seed=11))
    state = [(k, TensorRef.from_tensor(k, v.detach())) for k, v in model.eval().state_dict().items()]
    graph = graph_from_tensors("test", Path("in-memory"), state, files=[], order="module order")
    permuted, _ = attacks.permute(graph, tensors_of(graph), seed=12)
    with torch.no_grad():
        model.load_state_dict({f"{m}.{r}": t.to(model.state_dict()[f"{m}.{r}"].dtype)
                               for m, params in permuted.items() for r, t in params.items()})  # fmt: skip
    files = training.save_model(model, tmp_path_factory.mktemp("derived"), "derived")
    suspect = load_model(files["safetensors"])
    assert finding(suspect, gr_owner).verdict is not Verdict.DETECTED
    restored, log = run_restorers(suspect, reference, restorers=[ChannelRestorer(), FoldRestorer(), ScaleRestorer()])
    evidence = log[0]["log"]["evidence"]
    assert evidence["derived"] and evidence["score"] > 0.9
    assert finding(restored, gr_owner).verdict is Verdict.DETECTED
