"""restore-basis against ``invertible-map`` (LFEA): an invertible map and its inverse between two linear
layers of an architecture that has such a pair.

Neither built-in architecture has one (a ReLU or a pooling follows every layer), so the owners here are the
smallest real ones that do: the SmallCNN (width 2, so that HufuNet's EPH fits) and the SmallResNet with
each 3x3 convolution followed directly by a 1x1 convolution (``conv2.0 -> conv2.1``; in the ResNet the
blocks' convolutions, inside the residual connections). Each is trained once per module with Greedy
Residuals in one pair's 3x3 convolution and HufuNet in every 3x3 convolution, published as safetensors;
the thief's copy is written as safetensors (names and shapes unchanged) and as ONNX (batch-norm folded
into the 1x1 convolution). Not found before restore, found after, the function within 1e-4; an
independently trained model of the same architecture is never aligned.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519
from safetensors.torch import save_file

from auditor.audit.detect import run_detectors
from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.bundle import load_bundle
from auditor.findings import Verdict
from auditor.graph import LayerGraph
from auditor.plugin_manager import registered
from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
from auditor.plugins.hufunet.detector import TAU_ACC
from auditor.plugins.hufunet.generate import generate_hufunet, load_hufunet
from auditor.plugins.hufunet.owner import plant, write_bundle
from auditor.plugins.restore import basis
from auditor.plugins.restore.plugin import (
    BasisRestorer,
    CanonicalRestorer,
    ChannelRestorer,
    FoldRestorer,
    ScaleRestorer,
)
from auditor.toolkit import data as datasets
from auditor.toolkit import edits, training
from auditor.toolkit.channels import tensors_of
from auditor.toolkit.modelio import predictor

pytestmark = pytest.mark.usefixtures("one_thread")

REST = (ChannelRestorer(), FoldRestorer(), ScaleRestorer())
ALL = (CanonicalRestorer(), BasisRestorer(), *REST)
FACTORIES = """
from torch import nn
from auditor.toolkit import models as zoo

def _paired(conv):
    # a 3x3 convolution followed directly by a 1x1 convolution over its output: a linear pair
    return nn.Sequential(conv, nn.Conv2d(conv.out_channels, conv.out_channels, 1, bias=False))

def cnn():
    m = zoo.SmallCNN(width=2)
    m.conv1, m.conv2, m.conv3 = _paired(m.conv1), _paired(m.conv2), _paired(m.conv3)
    return m

def resnet():
    m = zoo.SmallResNet()
    for block in (m.layer1, m.layer2):
        block.conv1, block.conv2 = _paired(block.conv1), _paired(block.conv2)
    return m
"""
#: Every 3x3 convolution (the HufuNet hosts) is the first of a pair; Greedy Residuals marks this pair's.
PAIRS = {"cnn": ("conv2.0", "conv2.1"), "resnet": ("layer2.conv2.0", "layer2.conv2.1")}
N_PAIRS = {"cnn": 3, "resnet": 4}
EPOCHS = {"cnn": 6, "resnet": 4}


@pytest.fixture(scope="module")
def factories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module with the two pair architectures (``cnn``, ``resnet``), as ``--model-factory`` names them."""
    path = tmp_path_factory.mktemp("pair_models") / "pair_models.py"
    path.write_text(FACTORIES)
    return path


def _build(factories: Path, arch: str, seed: int) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("pair_models", factories)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(seed)
    model: torch.nn.Module = getattr(module, arch)()
    return model


def _train_owner(factories: Path, arch: str, out: Path) -> SimpleNamespace:
    first = PAIRS[arch][0]
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
    hmac_key = hashlib.sha256(f"restore basis test: {arch}".encode()).digest()
    generate_hufunet(out=out / "hufunet_secret.json", seed=0, hmac_key=hmac_key)
    net, secret = load_hufunet(out / "hufunet_secret.json")
    data = datasets.digits(split_seed=0)
    model = _build(factories, arch, seed=0)
    wm = GreedyResidualsWatermark.create(model, private_key=key, message=f"(c) 2025 Alice: pair {arch}",
                                         layers=[f"{first}.weight"])  # fmt: skip
    hufunet = plant(model, net, hmac_key)  # every 3x3 convolution: EPH needs more kernels than one layer has
    try:
        config = training.TrainConfig(epochs=EPOCHS[arch], lr=1e-2, seed=0)
        training.train(model, data.train, config, penalty=wm.penalty, after_step=hufunet.frozen.after_step)
    finally:
        hufunet.frozen.detach()
    model.eval()
    files = training.save_model(model, out, "model")
    wm.save_bundle(out / "gr_bundle.json", model, model_file=files["safetensors"], architecture=arch)
    write_bundle(out / "hufunet_bundle.json", model, hufunet, net, secret, files=files, architecture=arch)
    bundles = [load_bundle(out / "gr_bundle.json"), load_bundle(out / "hufunet_bundle.json")]
    return SimpleNamespace(model=model, files=files, bundles=bundles, data=data, out=out, arch=arch,
                           factory=f"{factories}:{arch}")  # fmt: skip


@pytest.fixture(scope="module")
def owners(factories: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, SimpleNamespace]:
    """Both pair owners, trained on first use (the ResNet only by the slow tests)."""
    built: dict[str, SimpleNamespace] = {}

    class Owners(dict[str, SimpleNamespace]):
        def __missing__(self, arch: str) -> SimpleNamespace:
            built[arch] = _train_owner(factories, arch, tmp_path_factory.mktemp(f"pair_{arch}"))
            self[arch] = built[arch]
            return built[arch]

    return Owners()


def verdicts(graph: LayerGraph, owner: SimpleNamespace, restorers: tuple[Any, ...]) -> dict[str, Any]:
    restored, log = run_restorers(graph, load_model(owner.files["safetensors"]), restorers=restorers)
    return {f.detector: f for f in run_detectors(restored, bundles=owner.bundles)} | {"log": log}


def _map_attack(owner: SimpleNamespace, out: Path, **options: Any) -> dict[str, Any]:
    attack = registered("attacks")["invertible-map"].component
    return attack.apply(owner.files["safetensors"], out, options={"seed": 7, "model_factory": owner.factory,
                                                                   **options})  # fmt: skip


def _found_only_after_alignment(owner: SimpleNamespace, tmp_path: Path, suffix: str) -> None:
    suspect = tmp_path / f"mapped{suffix}"
    summary = _map_attack(owner, suspect)
    assert list(PAIRS[owner.arch]) in summary["pairs"] and len(summary["pairs"]) == N_PAIRS[owner.arch]
    assert summary["max_output_change"] <= 1e-4
    run = predictor(suspect, model_factory=owner.factory)
    assert run is not None
    x = owner.data.test.tensors[0]
    with torch.no_grad():
        assert float((run(x) - owner.model(x)).abs().max()) <= 1e-4
    graph = load_model(suspect)
    before = verdicts(graph, owner, REST)
    assert before["greedy-residuals"].verdict is not Verdict.DETECTED
    assert before["hufunet"].verdict is not Verdict.DETECTED
    after = verdicts(graph, owner, ALL)
    entry = after["log"][1]["log"]
    assert entry["acted"], entry["reason"]
    assert len(entry["maps"]) == N_PAIRS[owner.arch]
    assert all(fit["acted"] and fit["residual"] < 1e-3 and 1 < fit["condition"] < 100 for fit in entry["maps"])
    assert after["greedy-residuals"].verdict is Verdict.DETECTED, after["greedy-residuals"].summary
    assert after["hufunet"].verdict is Verdict.DETECTED and after["hufunet"].metrics["diff_acc"] < TAU_ACC


@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_cnn_pair_mapped_is_found_only_after_alignment(
    owners: dict[str, SimpleNamespace], tmp_path: Path, suffix: str
) -> None:
    _found_only_after_alignment(owners["cnn"], tmp_path, suffix)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_resnet_pair_mapped_is_found_only_after_alignment(
    owners: dict[str, SimpleNamespace], tmp_path: Path, suffix: str
) -> None:
    _found_only_after_alignment(owners["resnet"], tmp_path, suffix)


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["insert-identity", "bn-between", "chain"])
def test_resnet_pair_with_a_chain_is_fused_as_the_reference_has_it(
    owners: dict[str, SimpleNamespace], tmp_path: Path, edit: str
) -> None:
    """The reference has its own chain (the pair): the suspect's chain over the same widths is fused into
    two layers, not one, and the layer the thief edited comes back."""
    owner = owners["resnet"]
    suspect = tmp_path / f"{edit}.onnx"
    attack = registered("attacks")[edit].component
    attack.apply(owner.files["safetensors"], suspect, options={"seed": 3, "model_factory": owner.factory,
                                                             "layers": "stem, layer2.conv2.0"})  # fmt: skip
    after = verdicts(load_model(suspect), owner, ALL)
    canonical = after["log"][0]["log"]
    assert canonical["acted"], canonical["reason"]
    assert [f["reference"] for f in canonical["fusions"]] == ["stem", "layer2.conv2.0"]  # the pair's 1x1 stays
    assert all(f["chain"][-1] != "layer2.conv2.1" for f in canonical["fusions"])
    assert after["greedy-residuals"].verdict is Verdict.DETECTED
    assert after["hufunet"].verdict is Verdict.DETECTED


def _fit(log: dict[str, Any], first: str) -> dict[str, Any]:
    return next(f for f in log["maps"] if f["first"] == first)


def _mapped_graph(owner: SimpleNamespace, condition: float) -> LayerGraph:
    """The owner's file with a map of this condition number put in directly (no function check: a map this
    ill-conditioned changes float32 outputs, which is one more reason not to trust its inverse)."""
    graph = load_model(owner.files["safetensors"])
    tensors = edits.invertible_map(graph, tensors_of(graph), [PAIRS[owner.arch]], seed=1, condition=condition)
    state = {f"{layer}.{role}": t for layer, params in tensors.items() for role, t in params.items()}
    path = owner.out / f"cond-{condition:g}.safetensors"
    save_file(state, str(path))
    return load_model(path)


def test_an_ill_conditioned_map_is_left_alone(owners: dict[str, SimpleNamespace]) -> None:
    owner = owners["cnn"]
    graph = _mapped_graph(owner, 1e7)
    same, log = BasisRestorer().restore(graph, load_model(owner.files["safetensors"]))
    assert same is graph and not log["acted"]
    fit = _fit(log, "conv2.0")
    assert fit["condition"] > basis.MAX_CONDITION and "ill-conditioned" in fit["note"]
    assert "conv2.0 -> conv2.1: ill-conditioned" in log["reason"] and log["reason"].startswith("no invertible map")


def test_an_orthogonal_map_is_found_by_procrustes(owners: dict[str, SimpleNamespace]) -> None:
    owner = owners["cnn"]
    graph = _mapped_graph(owner, 1.0)
    aligned, log = BasisRestorer().restore(graph, load_model(owner.files["safetensors"]))
    fit = _fit(log, "conv2.0")
    assert log["acted"] and fit["method"] == "orthogonal Procrustes" and fit["condition"] == pytest.approx(1.0)
    owner_w = owner.model.state_dict()["conv2.0.weight"]
    assert torch.allclose(aligned.layer("conv2.0").params["weight"].read(), owner_w, atol=1e-5)


def test_a_scaled_permutation_is_left_to_the_channel_steps(owners: dict[str, SimpleNamespace], tmp_path: Path) -> None:
    """The owner's own file, and its pair with the middle channels permuted and positively scaled: both
    are maps the channel and scale restorers undo (and across a ReLU too); restore-basis leaves them."""
    owner = owners["cnn"]
    reference = load_model(owner.files["safetensors"])
    same, log = BasisRestorer().restore(reference, reference)
    assert same is reference and all("permutation times a diagonal" in f["note"] for f in log["maps"])
    first, second = PAIRS["cnn"]
    state = {k: v.clone() for k, v in owner.model.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    perm, scale = torch.randperm(64, generator=gen), torch.empty(64).uniform_(0.5, 2.0, generator=gen)
    state[f"{first}.weight"] = state[f"{first}.weight"][perm] * scale.reshape(-1, 1, 1, 1)
    state[f"{second}.weight"] = state[f"{second}.weight"][:, perm] / scale.reshape(1, -1, 1, 1)
    save_file(state, str(tmp_path / "permuted.safetensors"))
    graph = load_model(tmp_path / "permuted.safetensors")
    same, log = BasisRestorer().restore(graph, reference)
    assert same is graph and not log["acted"]
    assert "permutation times a diagonal: left to restore-channels and restore-scale" in _fit(log, first)["note"]


def test_an_innocent_pair_model_is_never_aligned(
    owners: dict[str, SimpleNamespace], factories: Path, tmp_path: Path
) -> None:
    owner = owners["cnn"]
    model = _build(factories, "cnn", seed=11)
    training.train(model, owner.data.train, training.TrainConfig(epochs=2, lr=1e-2, seed=11))
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "innocent.safetensors"))
    graph = load_model(tmp_path / "innocent.safetensors")
    result = verdicts(graph, owner, ALL)
    entry = result["log"][1]["log"]
    assert not entry["acted"], entry
    # Either no map explains its pair, or one does and the guard refuses: the log says which.
    assert len(entry["maps"]) == N_PAIRS["cnn"]
    explained = [f for f in entry["maps"] if f["acted"]]
    assert not explained or entry["reason"].startswith("left alone: aligned, not demonstrably derived")
    assert all(f["residual"] > basis.MAX_RESIDUAL or f["acted"] for f in entry["maps"]), entry["maps"]
    assert result["greedy-residuals"].verdict is not Verdict.DETECTED
    assert result["hufunet"].verdict is not Verdict.DETECTED
