"""Restore on a residual network: both branches of an add share one channel order and scale.

A SmallResNet carrying both watermarks (trained once per module) is permuted, rescaled and
negated channel by channel: the stem and the first block's second
convolution feed one add, the second block's convolution and its projection
shortcut another, so each pair must move together. The reference is the
owner's released file, bare (safetensors: no graph, the readers come from the
data) or as ONNX (a real graph); the suspect is a bare state dict or a folded
ONNX export.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519
from torch import nn

from auditor.audit.detect import run_detectors
from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.bundle import load_bundle
from auditor.findings import Verdict
from auditor.graph import LayerGraph
from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
from auditor.plugins.hufunet.generate import generate_hufunet, load_hufunet
from auditor.plugins.hufunet.owner import plant, write_bundle
from auditor.plugins.restore.plugin import ChannelRestorer, FoldRestorer, ScaleRestorer
from auditor.toolkit import data as datasets
from auditor.toolkit import edits as attacks
from auditor.toolkit import models as zoo
from auditor.toolkit import training
from auditor.toolkit.channels import channel_spaces

pytestmark = pytest.mark.usefixtures("one_thread")

RESTORERS = (ChannelRestorer(), FoldRestorer(), ScaleRestorer())
CONVS = ("stem", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.shortcut.0")


def export(model: nn.Module, path: Path, *, fold: bool) -> Path:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, do_constant_folding=fold)
    return path


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("resnet_owner")
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    hmac_key = hashlib.sha256(b"restore resnet test: HufuNet key").digest()
    generate_hufunet(out=out / "hufunet_secret.json", seed=0, hmac_key=hmac_key)
    net, secret = load_hufunet(out / "hufunet_secret.json")
    data = datasets.digits(split_seed=0)
    model = zoo.build("resnet", seed=0)
    wm = GreedyResidualsWatermark.create(model, private_key=key, message="(c) 2025 Alice: SmallResNet")
    hufunet = plant(model, net, hmac_key)
    try:
        config = training.TrainConfig(epochs=6, lr=1e-2, seed=0)
        training.train(model, data.train, config, penalty=wm.penalty, after_step=hufunet.frozen.after_step)
    finally:
        hufunet.frozen.detach()
    model.eval()
    files = training.save_model(model, out, "model")
    wm.save_bundle(out / "gr_bundle.json", model, model_file=files["safetensors"], architecture="resnet")
    write_bundle(out / "hufunet_bundle.json", model, hufunet, net, secret, files=files, architecture="resnet")
    graph = load_model(export(model, out / "model.onnx", fold=False))
    edited = attacks.permute(graph, attacks.module_tensors(model), seed=1)[0]
    edited = attacks.negate(graph, attacks.scale(graph, edited, seed=2), seed=3)
    thief = copy.deepcopy(model)
    thief.load_state_dict({f"{m}.{r}": t.to(model.state_dict()[f"{m}.{r}"].dtype) for m, p in edited.items()
                           for r, t in p.items()})  # fmt: skip
    stolen = training.save_model(thief.eval(), out, "stolen")
    bundles = [load_bundle(out / "gr_bundle.json"), load_bundle(out / "hufunet_bundle.json")]
    return SimpleNamespace(model=model, thief=thief, out=out, files=files, graph=graph, data=data, stolen=stolen,
                           bundles=bundles)  # fmt: skip


def verdicts(graph: LayerGraph, owner: SimpleNamespace) -> dict[str, Verdict]:
    """Each scheme's verdict (Greedy Residuals and HufuNet)."""
    return {f.detector: f.verdict for f in run_detectors(graph, bundles=owner.bundles)}


DETECTED = {"greedy-residuals": Verdict.DETECTED, "hufunet": Verdict.DETECTED}


def test_the_residual_adds_share_channel_spaces(owner: SimpleNamespace) -> None:
    shared = sorted(sorted(sp.producers) for sp in channel_spaces(owner.graph) if len(sp.producers) > 1)
    assert shared == [["layer1.conv2", "stem"], ["layer2.conv2", "layer2.shortcut.0"]]


def test_the_edits_keep_the_function_and_hide_the_watermark(owner: SimpleNamespace) -> None:
    x = owner.data.test.tensors[0]
    with torch.no_grad():
        assert float((owner.thief(x) - owner.model(x)).abs().max()) < 1e-4
    assert verdicts(load_model(owner.files["safetensors"]), owner) == DETECTED
    assert Verdict.DETECTED not in verdicts(load_model(owner.stolen["safetensors"]), owner).values()


@pytest.mark.parametrize("reference_form", ["safetensors", "onnx"])
def test_restore_brings_back_every_convolution(owner: SimpleNamespace, reference_form: str) -> None:
    reference = load_model(owner.files["safetensors"] if reference_form == "safetensors" else owner.out / "model.onnx")
    restored, log = run_restorers(load_model(owner.stolen["safetensors"]), reference, restorers=RESTORERS)
    expected = "the reference's inferred edges" if reference_form == "safetensors" else "the reference's graph"
    assert log[0]["log"]["edges_from"] == expected
    assert [e["log"]["acted"] for e in log] == [True, False, True]
    assert verdicts(restored, owner) == DETECTED
    released = load_model(owner.files["safetensors"])
    for name in CONVS:
        got, want = (g.layer(name).params["weight"].read(float32=True) for g in (restored, released))
        assert torch.allclose(got, want, atol=1e-5), name


def test_restore_of_a_folded_onnx_export(owner: SimpleNamespace) -> None:
    suspect = load_model(export(owner.thief, owner.out / "stolen_folded.onnx", fold=True))
    restored, log = run_restorers(suspect, load_model(owner.files["safetensors"]), restorers=RESTORERS)
    assert log[0]["log"]["edges_from"] == "the suspect's own graph"
    assert sum(row["unfolded"] for row in log[1]["log"]["layers"]) == len(CONVS)
    assert verdicts(restored, owner) == DETECTED
    released = load_model(owner.files["safetensors"])
    convs = [x for x in restored.layers if x.kind.value == "conv2d"]
    for layer in convs:
        original = log[0]["log"]["layers"][[r["name"] for r in log[0]["log"]["layers"]].index(layer.name)]["reference"]
        want = released.layer(original).params["weight"].read(float32=True)
        assert torch.allclose(layer.params["weight"].read(float32=True), want, atol=1e-5), original
