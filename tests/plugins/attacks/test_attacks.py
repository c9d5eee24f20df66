"""Attack plugins on untrained built-in models: function preservation, untouched inputs, output checks,
the weight attacks' exact effect, and models that are not built-in architectures."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from auditor.audit.load import load_model
from auditor.bases import Attack
from auditor.errors import InputError, UsageError
from auditor.plugin_manager import registered
from auditor.toolkit import models, training
from auditor.toolkit.modelio import predictor, read_model, runnable

pytestmark = pytest.mark.usefixtures("one_thread")


def attacks() -> dict[str, Attack]:
    return {aid: reg.component for aid, reg in registered("attacks").items()}


def _randomise_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Batch-norm statistics and affine parameters away from 0/1, so that folding, scaling and sign flips
    through them are really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)  # type: ignore[union-attr]
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)  # type: ignore[union-attr]
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SimpleNamespace]:
    """cnn, resnet and lstm (width 1, seeded, batch-norm randomised), each saved as .pt and .safetensors."""
    out = tmp_path_factory.mktemp("zoo")
    built = {}
    for i, arch in enumerate(("cnn", "resnet", "lstm")):
        model = _randomise_norms(models.build(arch, seed=i), seed=i)
        files = training.save_model(model, out / arch, "model")
        x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            built[arch] = SimpleNamespace(model=model, files=files, x=x, y=model(x), out=out / arch)
    return built


def _digest(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


FUNCTION_PRESERVING = ["bn-fold", "expand", "factor-linear", "onnx-export", "permute", "scale", "sign-flip",
                       "insert-identity", "bn-between", "chain", "split-outputs", "split-inputs", "neuron-clique",
                       "neuron-split"]  # fmt: skip
#: Edits of transformers only (tested on transformers in test_transformer_attacks.py).
TRANSFORMER = {"head-permute", "mlp-permute", "head-scale", "norm-fold", "residual-rotate", "rope-reorder"}
#: New layers: written as ONNX, so that the file runs (and is read back with more layers than the original).
STRUCTURAL = ("factor-linear", "insert-identity", "bn-between", "chain", "split-outputs", "split-inputs")


def test_function_preserving_claims_are_the_tested_ones() -> None:
    """A new attack that claims to keep the function must join the test below (forgeries are tested
    unchanged in test_attacks_training.py)."""
    claimed = {aid for aid, a in attacks().items() if a.function_preserving and not aid.startswith("forge-")}
    # invertible-map: on a model with a linear pair (test_linear_attacks); TRANSFORMER: test_transformer_attacks
    assert claimed == {*FUNCTION_PRESERVING, "invertible-map", *TRANSFORMER}


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
@pytest.mark.parametrize(
    ("attack", "options"),
    [(a, {}) for a in FUNCTION_PRESERVING] + [("scale", {"before_norm": False}), ("sign-flip", {"fraction": 1.0})],
)
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_function_preserving_attack_keeps_outputs(
    zoo: dict[str, SimpleNamespace], arch: str, attack: str, options: dict[str, Any], fmt: str
) -> None:
    m = zoo[arch]
    suffix = ".onnx" if attack in ("onnx-export", *STRUCTURAL) else ".safetensors"
    out = m.out / f"{attack}-{'-'.join(map(str, options.values()))}-{fmt}{suffix}"
    summary = attacks()[attack].apply(m.files[fmt], out, options={**options, "seed": 3, "overwrite": True})
    run = predictor(out)
    assert run is not None
    change = float((run(m.x) - m.y).abs().max())
    assert change <= 1e-4, (attack, summary)
    if suffix == ".onnx":  # the graph itself is read back: a factored model has one layer more per factor
        if attack in STRUCTURAL:
            assert len(load_model(out).layers) > len(load_model(m.files["safetensors"]).layers), summary
    else:  # the attack changed the stored weights, or it proved nothing
        before, after = read_model(m.files[fmt]).state_dict(), load_file(out)
        assert before.keys() != after.keys() or any(not torch.equal(before[k], after[k].float()) for k in before)


def test_the_dynamo_exporter_keeps_outputs_too(zoo: dict[str, SimpleNamespace]) -> None:
    m = zoo["resnet"]
    out = m.out / "dynamo.onnx"
    summary = attacks()["onnx-export"].apply(m.files["pt"], out, options={"exporter": "dynamo"})
    run = predictor(out)
    assert summary["exporter"] == "dynamo" and run is not None
    assert float((run(m.x) - m.y).abs().max()) <= 1e-4


@pytest.mark.parametrize("attack", ["permute", "expand", "cut-off", "supplement"])
def test_channel_attacks_on_the_resnet_follow_the_skip_connections(zoo: dict[str, SimpleNamespace],
                                                                    attack: str) -> None:  # fmt: skip
    """The residual add makes stem and layer1.conv2 one channel space: both move together."""
    m = zoo["resnet"]
    out = m.out / f"skip-{attack}.safetensors"
    summary = attacks()[attack].apply(m.files["safetensors"], out, options={"seed": 1})
    assert summary["edges_from"].startswith("an ONNX trace")
    assert ["stem", "layer1.conv2"] in [sp["producers"] for sp in summary["spaces"]]
    state = load_file(out)
    assert state["stem.weight"].shape[0] == state["layer1.conv2.weight"].shape[0] == state["bn.weight"].shape[0]
    found = runnable(state)
    assert found is not None
    assert ("resized" in found.name) == (attack != "permute")


@pytest.mark.parametrize("attack", ["cut-off", "supplement", "prune-channels", "quantize-int8", "cast-fp16"])
def test_lossy_attacks_change_the_outputs(zoo: dict[str, SimpleNamespace], attack: str) -> None:
    m = zoo["cnn"]
    out = m.out / f"lossy-{attack}.pt"
    attacks()[attack].apply(m.files["pt"], out, options={"seed": 1})
    run = predictor(out)
    assert run is not None
    assert float((run(m.x) - m.y).abs().max()) > 1e-5


def _cheap_options(attack: str, gr_bundle: Path, hufunet: Path) -> dict[str, Any]:
    return {
        "fine-tune": {"epochs": 1, "fraction": 0.2}, "fine-tune-anneal": {"epochs": 1, "fraction": 0.2},
        "overwrite-gr": {"epochs": 1, "fraction": 0.2}, "forge-gr": {"bundle": str(gr_bundle), "signatures": 5},
        "overwrite-hufunet": {"epochs": 1, "fraction": 0.2, "hufunet": str(hufunet)},
        "forge-hufunet": {"keys": 2, "epochs": 1},
    }.get(attack, {})  # fmt: skip


@pytest.fixture(scope="module")
def cnn_secrets(zoo: dict[str, SimpleNamespace], tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A Greedy Residuals bundle for the untrained cnn (no training needed to forge against it) and a HufuNet."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
    from auditor.plugins.hufunet.generate import generate_hufunet

    out = tmp_path_factory.mktemp("secrets")
    m = zoo["cnn"]
    wm = GreedyResidualsWatermark.create(m.model, private_key=ed25519.Ed25519PrivateKey.from_private_bytes(
        bytes(32)), message="(c) test")  # fmt: skip
    wm.save_bundle(out / "gr.json", m.model, model_file=m.files["safetensors"])
    generate_hufunet(out=out / "hufunet.json", seed=0, epochs=20, hmac_key=hashlib.sha256(b"attack tests").digest())
    return SimpleNamespace(gr=out / "gr.json", hufunet=out / "hufunet.json")


# invertible-map needs a model with a linear pair, which the built-ins lack: test_linear_attacks checks it;
# the transformer attacks need a transformer: test_transformer_attacks checks them.
@pytest.mark.parametrize("attack", sorted(set(attacks()) - {"invertible-map"} - TRANSFORMER))
def test_attack_never_touches_its_input(zoo: dict[str, SimpleNamespace], cnn_secrets: SimpleNamespace,
                                        attack: str) -> None:  # fmt: skip
    m = zoo["cnn"]
    before = {fmt: _digest(path) for fmt, path in m.files.items()}
    suffix = ".onnx" if attack in ("onnx-export", "quantize-dynamic") else ".pt"
    out = m.out / f"untouched-{attack}{suffix}"
    summary = attacks()[attack].apply(m.files["safetensors"], out,
                                      options=_cheap_options(attack, cnn_secrets.gr, cnn_secrets.hufunet))  # fmt: skip
    assert out.is_file() and summary["out"] == str(out)
    assert {fmt: _digest(path) for fmt, path in m.files.items()} == before
    assert load_model(out).layers


def test_out_is_checked_before_any_work(zoo: dict[str, SimpleNamespace], tmp_path: Path) -> None:
    m = zoo["cnn"]
    prune = attacks()["prune-magnitude"]
    with pytest.raises(UsageError, match="--out is the input model"):
        prune.apply(m.files["pt"], m.files["pt"], options={"overwrite": True})
    with pytest.raises(UsageError, match=r"cannot write a \.bin file; --out must end in \.safetensors, \.pt, \.onnx"):
        prune.apply(m.files["pt"], tmp_path / "x.bin", options={})
    with pytest.raises(UsageError, match=r"--out must end in \.safetensors, \.pt$"):
        attacks()["cast-fp16"].apply(m.files["pt"], tmp_path / "x.onnx", options={})
    with pytest.raises(UsageError, match=r"--out must end in \.onnx$"):
        attacks()["onnx-export"].apply(m.files["pt"], tmp_path / "x.pt", options={})
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="already exists; choose another --out or --overwrite"):
        prune.apply(m.files["pt"], existing, options={})
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(InputError, match="no such file or folder"):
        prune.apply(tmp_path / "missing.pt", tmp_path / "y.pt", options={})
    prune.apply(m.files["pt"], existing, options={"overwrite": "yes"})
    assert existing.read_bytes() != b"keep me"


def test_options_are_checked(zoo: dict[str, SimpleNamespace], tmp_path: Path) -> None:
    m, prune = zoo["cnn"], attacks()["prune-magnitude"]
    with pytest.raises(UsageError, match="prune-magnitude has no option 'epochs'; its options: layers, "):
        prune.apply(m.files["pt"], tmp_path / "a.pt", options={"epochs": 3})
    with pytest.raises(UsageError, match="option rate must be a number, not 'lots'"):
        prune.apply(m.files["pt"], tmp_path / "a.pt", options={"rate": "lots"})
    with pytest.raises(UsageError, match="option scope must be one of global, layer, not 'row'"):
        prune.apply(m.files["pt"], tmp_path / "a.pt", options={"scope": "row"})
    with pytest.raises(UsageError, match="the rate must be between 0 and 1, not 1.5"):
        prune.apply(m.files["pt"], tmp_path / "a.pt", options={"rate": "1.5"})
    assert not (tmp_path / "a.pt").exists()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_zeroes_the_smallest_weights(zoo: dict[str, SimpleNamespace], scope: str) -> None:
    m = zoo["cnn"]
    out = m.out / f"prune-{scope}.safetensors"
    attacks()["prune-magnitude"].apply(m.files["pt"], out, options={"rate": "0.3", "scope": scope})
    before, after = m.model.state_dict(), load_file(out)
    names = ["conv1.weight", "conv2.weight", "conv3.weight", "head.weight"]
    zeroed = torch.cat([(after[n] == 0).flatten() for n in names])
    weights = torch.cat([before[n].abs().flatten() for n in names])
    if scope == "global":
        assert zeroed.sum() == round(0.3 * len(weights))
        assert weights[zeroed].max() <= weights[~zeroed].min()
    else:
        for n in names:
            z = after[n] == 0
            assert int(z.sum()) == round(0.3 * z.numel())
            assert before[n].abs()[z].max() <= before[n].abs()[~z].min()
    assert torch.equal(after["bn1.weight"], before["bn1.weight"])  # batch-norm is not pruned


def test_random_pruning_is_seeded(zoo: dict[str, SimpleNamespace]) -> None:
    m, prune = zoo["cnn"], attacks()["prune-random"]
    paths = []
    for i, seed in enumerate((5, 5, 6)):
        paths.append(m.out / f"random-{i}.safetensors")
        prune.apply(m.files["pt"], paths[-1], options={"rate": 0.5, "seed": seed})
    masks = [load_file(p)["conv3.weight"] == 0 for p in paths]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert abs(float(masks[0].float().mean()) - 0.5) < 1e-3


def test_channel_pruning_zeroes_the_weakest_filters(zoo: dict[str, SimpleNamespace]) -> None:
    m = zoo["cnn"]
    out = m.out / "filters.safetensors"
    summary = attacks()["prune-channels"].apply(m.files["pt"], out, options={"rate": 0.25})
    w, pruned = m.model.conv3.weight.detach(), load_file(out)["conv3.weight"]
    dead = pruned.flatten(1).abs().sum(1) == 0
    assert int(dead.sum()) == 16 == summary["zeroed_filters"]["conv3"]
    norms = w.flatten(1).abs().sum(1)
    assert norms[dead].max() <= norms[~dead].min()
    assert "head" not in summary["zeroed_filters"]


@pytest.mark.parametrize(("attack", "dtype"), [("cast-fp16", "float16"), ("cast-bf16", "bfloat16")])
def test_casts_store_the_narrow_type(zoo: dict[str, SimpleNamespace], attack: str, dtype: str) -> None:
    m = zoo["resnet"]
    out = m.out / f"{attack}.safetensors"
    attacks()[attack].apply(m.files["pt"], out, options={})
    graph = load_model(out)
    assert {ref.dtype for layer in graph.layers for role, ref in layer.params.items()
            if role != "num_batches_tracked"} == {dtype}  # fmt: skip
    run = predictor(out)
    assert run is not None and float((run(m.x) - m.y).abs().max()) < 0.1


def test_int8_quantization_puts_each_row_on_its_grid(zoo: dict[str, SimpleNamespace]) -> None:
    m = zoo["cnn"]
    out = m.out / "int8.safetensors"
    attacks()["quantize-int8"].apply(m.files["pt"], out, options={"bits": 8})
    w, q = m.model.conv2.weight.detach().flatten(1), load_file(out)["conv2.weight"].flatten(1)
    scale = w.abs().amax(1, keepdim=True) / 127
    steps = q / scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert float(((q - w).abs() / scale).max()) <= 0.5 + 1e-4
    assert all(len(row.unique()) <= 255 for row in q)


def test_attacks_read_onnx_and_write_state_dicts(zoo: dict[str, SimpleNamespace]) -> None:
    m = zoo["cnn"]
    exported = m.out / "for-onnx-input.onnx"
    attacks()["onnx-export"].apply(m.files["pt"], exported, options={})
    out = m.out / "from-onnx.safetensors"
    attacks()["prune-magnitude"].apply(exported, out, options={"rate": 0.2})
    assert load_model(out).format == "safetensors"
    with pytest.raises(UsageError, match="writing ONNX needs to run the model"):
        attacks()["prune-magnitude"].apply(exported, m.out / "back.onnx", options={"rate": 0.2})


CUSTOM = """
import torch


class Custom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.norm = torch.nn.BatchNorm2d(6)
        self.classifier = torch.nn.Linear(6 * 64, 10)

    def forward(self, x):
        return self.classifier(torch.relu(self.norm(self.features(x))).flatten(1))


def build():
    return Custom()
"""


def test_models_that_are_no_built_in_need_their_factory(tmp_path: Path) -> None:
    """A conv, a batch-norm and a linear layer under names no built-in uses."""
    from auditor.toolkit.data import load_factory

    (tmp_path / "custom_factory.py").write_text(CUSTOM)
    factory = f"{tmp_path / 'custom_factory.py'}:build"
    model = _randomise_norms(load_factory(factory)(), seed=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "custom.safetensors")
    torch.save(model.state_dict(), tmp_path / "custom.pt")
    with pytest.raises(UsageError, match="fine-tuning needs to run the model, .* name its code with --model-factory"):
        attacks()["fine-tune"].apply(tmp_path / "custom.pt", tmp_path / "ft.pt", options={"epochs": 1})
    with pytest.raises(UsageError, match="safetensors keeps no layer order"):
        attacks()["permute"].apply(tmp_path / "custom.safetensors", tmp_path / "p.pt", options={})
    summary = attacks()["permute"].apply(tmp_path / "custom.safetensors", tmp_path / "p.pt",
                                         options={"model_factory": factory})  # fmt: skip
    assert summary["edges_from"] == f"an ONNX trace of the model ({factory})"
    run = predictor(tmp_path / "p.pt", model_factory=factory)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert run is not None and float((run(x) - model(x)).abs().max()) <= 1e-4
    assert not torch.equal(load_file(tmp_path / "custom.safetensors")["features.weight"],
                           torch.load(tmp_path / "p.pt", weights_only=True)["features.weight"])  # fmt: skip
