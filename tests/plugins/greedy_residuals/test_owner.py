"""Greedy Residuals, owner side: layer rule, watermark object, bundle payload, fidelity, example, embed CLI."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from auditor import keys
from auditor.bases import Detector
from auditor.bundle import load_bundle
from auditor.errors import EXIT_USAGE, UsageError
from auditor.plugins.greedy_residuals.embedder import DEFAULTS, GreedyResidualsEmbedder
from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark, default_layers
from auditor.plugins.greedy_residuals.scheme import GRParams, alpha_from_signature, penalty_term
from auditor.toolkit import data as datasets
from auditor.toolkit import models as zoo
from auditor.toolkit import training

ROOT = Path(__file__).resolve().parents[3]
PASSPHRASE = b"correct horse battery staple"


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> keys.KeyPairPaths:
    return keys.generate_keypair(tmp_path_factory.mktemp("keys"), passphrase=PASSPHRASE)


@pytest.fixture(scope="module")
def private_key(key_files: keys.KeyPairPaths) -> Any:
    return keys.load_private_key(key_files.private, PASSPHRASE)


# ----------------------------------------------------------------------------- default layers


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.fc2 = nn.Linear(128, 128)
        self.out = nn.Linear(128, 10)


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 32)  # 32,000 weights: the largest, and never a candidate
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.classifier = nn.Linear(32, 10)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)  # 32 weights
        self.b = nn.Conv1d(8, 8, 3)  # 192 weights
        self.c = nn.Linear(8, 2)


def test_default_layers_cnn() -> None:
    # conv1 has 144 < 256 weights, the head is excluded
    assert default_layers(zoo.SmallCNN()) == ["conv2.weight", "conv3.weight"]


def test_default_layers_resnet() -> None:
    # the three largest; layer1.conv1 and layer1.conv2 tie and the earlier wins
    assert default_layers(zoo.SmallResNet()) == ["layer1.conv1.weight", "layer2.conv1.weight", "layer2.conv2.weight"]


def test_default_layers_mlp() -> None:
    assert default_layers(MLP()) == ["fc1.weight", "fc2.weight"]


def test_default_layers_lstm() -> None:
    # the recurrent module's largest matrix (16,384 hidden-to-hidden over 2,048 input-to-hidden)
    assert default_layers(zoo.RowLSTM()) == ["lstm.weight_hh_l0"]
    stacked = nn.Sequential(nn.GRU(16, 16, num_layers=2), nn.Linear(16, 2))
    assert default_layers(stacked) == ["0.weight_ih_l0"]  # ties: the first matrix


def test_default_layers_transformer() -> None:
    # six candidates (out_proj 1,024, linear1 and linear2 2,048 each, per encoder layer):
    # the three largest, ties by module order; never the embedding or in_proj_weight
    assert default_layers(TinyTransformer()) == [
        "encoder.layers.0.linear1.weight",
        "encoder.layers.0.linear2.weight",
        "encoder.layers.1.linear1.weight",
    ]


def test_default_layers_small_and_degenerate_models() -> None:
    assert default_layers(Tiny()) == ["b.weight"]  # none has 256 weights: the largest candidate
    assert default_layers(nn.Linear(32, 16)) == ["weight"]  # the head is all there is
    assert default_layers(MLP(), GRParams(bits=10_000)) == ["fc2.weight"]
    with pytest.raises(UsageError, match="no conv, linear, LSTM or GRU layer"):
        default_layers(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))


# ----------------------------------------------------------------------------- the watermark object


def test_create_with_named_layers(private_key: Any) -> None:
    model = zoo.SmallResNet()
    wm = GreedyResidualsWatermark.create(model, private_key=private_key, message="(c) A", layers=["stem.weight"])
    assert wm.layer_names == ["stem.weight"]
    assert (wm.layers[0].kind, wm.layers[0].kind_index, wm.layers[0].shape) == ("conv2d", 0, (32, 1, 3, 3))
    assert keys.verify(private_key.public_key(), wm.signature, b"(c) A")
    assert torch.equal(wm.alpha, alpha_from_signature(wm.signature, 256))
    assert not hasattr(wm, "private_key")
    for bad in ("head.bias", "bn.weight", "nope.weight", "layer1"):
        with pytest.raises(UsageError, match=re.escape(f"{bad!r} is not a weight")):
            GreedyResidualsWatermark.create(model, private_key=private_key, message="m", layers=[bad])
    with pytest.raises(UsageError, match="message is empty"):
        GreedyResidualsWatermark.create(model, private_key=private_key, message="")


def test_penalty_and_rates(private_key: Any) -> None:
    model = zoo.RowLSTM()
    wm = GreedyResidualsWatermark.create(model, private_key=private_key, message="(c) A")
    penalty = wm.penalty(model)
    expected = penalty_term(model.get_parameter("lstm.weight_hh_l0"), wm.alpha, wm.params)
    assert penalty.ndim == 0 and torch.allclose(penalty, expected)
    penalty.backward()
    assert model.lstm.weight_hh_l0.grad is not None and model.lstm.weight_ih_l0.grad is None
    rates = wm.rates(model)
    assert list(rates) == ["lstm.weight_hh_l0"] and 0.3 < rates["lstm.weight_hh_l0"] < 0.7  # untrained


def test_ed25519_keys_work(tmp_path: Path) -> None:
    pair = keys.generate_keypair(tmp_path, algorithm="ed25519")
    wm = GreedyResidualsWatermark.create(
        zoo.SmallCNN(), private_key=keys.load_private_key(pair.private), message="(c) B"
    )
    assert wm.signature_algorithm == "ed25519" and len(wm.signature) == 64


# ----------------------------------------------------------------------------- fidelity and the payload


@pytest.fixture(scope="module")
def trained(private_key: Any) -> dict[str, Any]:
    """SmallCNN on digits with the embedder's defaults, once with and once without the watermark."""
    data = datasets.digits()
    config = training.TrainConfig(
        epochs=DEFAULTS["epochs"], lr=DEFAULTS["lr"], batch_size=DEFAULTS["batch_size"], seed=0, device="cpu"
    )
    clean = zoo.build("cnn", seed=0)
    training.train(clean, data.train, config)
    marked = zoo.build("cnn", seed=0)
    wm = GreedyResidualsWatermark.create(marked, private_key=private_key, message="(c) 2025 Alice Example Ltd.")
    training.train(marked, data.train, config, penalty=wm.penalty)
    return {
        "data": data,
        "clean": clean,
        "model": marked,
        "wm": wm,
        "clean_acc": training.evaluate(clean, data.test),
        "acc": training.evaluate(marked, data.test),
    }


@pytest.mark.slow
def test_fidelity(trained: dict[str, Any]) -> None:
    """The issue's requirement: same training (seed 0) with and without the watermark,
    test accuracy within 1 percentage point, and every marked layer at 100%.

    Measured over seeds 0, 1, 2 (see the report): a single seed is within 1 pp for each,
    so one seed is tested here."""
    assert trained["acc"] >= 0.95
    assert abs(trained["acc"] - trained["clean_acc"]) <= 0.01, (trained["acc"], trained["clean_acc"])
    assert trained["wm"].rates(trained["model"]) == {"conv2.weight": 1.0, "conv3.weight": 1.0}
    rates_clean = trained["wm"].rates(trained["clean"]).values()
    assert all(0.35 < r < 0.65 for r in rates_clean)  # the unmarked twin is at chance


@pytest.mark.slow
def test_payload(trained: dict[str, Any], tmp_path: Path, key_files: keys.KeyPairPaths) -> None:
    model, wm = trained["model"], trained["wm"]
    files = training.save_model(model, tmp_path)
    payload = wm.payload(model, model_file=files["safetensors"], architecture="cnn")
    assert set(payload) == {"params", "message", "signature", "signature_algorithm", "public_key", "layers", "model"}
    assert payload["params"] == GRParams().to_dict()
    assert payload["message"] == "(c) 2025 Alice Example Ltd."
    assert payload["signature_algorithm"] == "rsa-pkcs1v15-sha256"
    assert payload["public_key"] == key_files.public.read_text()
    signature = base64.b64decode(payload["signature"], validate=True)
    public = keys.load_public_key(payload["public_key"])
    assert keys.verify(public, signature, payload["message"].encode())
    assert payload["layers"] == [
        {"name": "conv2", "param": "weight", "kind": "conv2d", "shape": [32, 16, 3, 3], "kind_index": 1,
         "release_rate": 1.0, "batch_norm": True},
        {"name": "conv3", "param": "weight", "kind": "conv2d", "shape": [64, 32, 3, 3], "kind_index": 2,
         "release_rate": 1.0, "batch_norm": True},
    ]  # fmt: skip
    import hashlib

    assert payload["model"] == {
        "sha256": hashlib.sha256(files["safetensors"].read_bytes()).hexdigest(),
        "file": "model.safetensors",
        "parameters": sum(p.numel() for p in model.parameters()),
        "architecture": "cnn",
    }
    recipe = {"dataset": trained["data"].describe()}
    assert wm.payload(model, model_file=files["pt"], training=recipe)["training"] == recipe

    sha = wm.save_bundle(tmp_path / "owner_bundle.json", model, model_file=files["safetensors"])
    bundle = load_bundle(tmp_path / "owner_bundle.json")
    assert (bundle.scheme, bundle.sha256, bundle.secret) == ("greedy-residuals", sha, False)
    assert bundle.payload["model"]["architecture"] is None
    text = (tmp_path / "owner_bundle.json").read_text()
    assert "PRIVATE" not in text and not _private_lines(key_files) & set(text.splitlines())


@pytest.mark.slow
def test_bundle_is_detected(trained: dict[str, Any], tmp_path: Path) -> None:
    """The detector reads the payload as written (a smoke test across the two halves)."""
    from auditor.audit.load import load_model
    from auditor.plugin_manager import registered

    files = training.save_model(trained["model"], tmp_path)
    trained["wm"].save_bundle(tmp_path / "b.json", trained["model"], model_file=files["safetensors"])
    detector = registered("detectors")["greedy-residuals"].component
    assert isinstance(detector, Detector)
    findings = detector.detect(load_model(files["safetensors"]), bundle=load_bundle(tmp_path / "b.json"), context={})
    assert [f.verdict.value for f in findings] == ["detected"]


# ----------------------------------------------------------------------------- example and docs


EXAMPLE = ROOT / "examples" / "greedy_residuals_loop.py"


def test_docs_show_the_example() -> None:
    doc = (ROOT / "docs" / "greedy_residuals.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert EXAMPLE.read_text() in blocks


@pytest.mark.slow
def test_example_runs(tmp_path: Path) -> None:
    # A fresh interpreter: the example script itself, run as a reader would run it, is under test.
    source = EXAMPLE.read_text()
    assert "range(20)" in source
    (tmp_path / "example.py").write_text(source.replace("range(20)", "range(2)"))  # the same code, shorter
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert re.match(r"test accuracy \d+\.\d\d%\n", result.stdout)
    assert "detection rate conv2.weight: " in result.stdout and "detection rate conv3.weight: " in result.stdout
    out = tmp_path / "gr_example"
    assert sorted(p.name for p in out.iterdir()) == ["keys", "model.safetensors", "owner_bundle.json"]
    assert load_bundle(out / "owner_bundle.json").payload["model"]["file"] == "model.safetensors"


# ----------------------------------------------------------------------------- the embed command


def _private_lines(pair: keys.KeyPairPaths) -> set[str]:
    return {line for line in pair.private.read_text().splitlines() if len(line) > 40}


@pytest.mark.slow
def test_embed_cli_end_to_end(
    tmp_path: Path, key_files: keys.KeyPairPaths, run_cli: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pass.txt").write_bytes(PASSPHRASE + b"\n")
    args = ["embed", "greedy-residuals", "--key", str(key_files.private), "--passphrase-file", "pass.txt"]
    args += ["--message", "(c) 2025 Alice Example Ltd.", "--out", "out", "--epochs", "4", "--device", "cpu"]
    result = run_cli(*args)
    assert result.code == 0, result.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "model.safetensors", "owner_bundle.json"]
    lines = result.stdout.splitlines()
    assert re.fullmatch(r"test accuracy: \d+\.\d\d% \(359 test examples, digits\)", lines[3])
    assert [line.split(":")[0] for line in lines[4:]] == ["detection rate conv2.weight", "detection rate conv3.weight"]
    assert all(re.search(r": \d+\.\d\d% \(\d+/256 bits; detection needs 169\)$", line) for line in lines[4:])
    assert "training" in result.stderr  # the progress bar

    bundle = load_bundle(out / "owner_bundle.json")
    assert bundle.payload["model"]["sha256"] == _sha(out / "model.safetensors")
    assert bundle.payload["model"]["architecture"] == "cnn"
    assert bundle.payload["training"]["dataset"]["test_sha256"] == datasets.digits().test_sha256
    everything = result.stdout + result.stderr + (out / "owner_bundle.json").read_text()
    assert "PRIVATE" not in everything and PASSPHRASE.decode() not in everything
    assert not any(line in everything for line in _private_lines(key_files))

    again = run_cli(*args, "--json")  # never overwrites silently
    assert again.code == EXIT_USAGE
    assert again.stderr.startswith("error: out/model.safetensors, out/model.pt, out/owner_bundle.json already exists")
    assert again.stderr.count("\n") == 1


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (["--arch", "vgg"], "error: unknown architecture 'vgg'; known: cnn, lstm, resnet\n"),
        (["--device", "tpu"], "error: bad device 'tpu'; use auto, cpu, cuda or cuda:N\n"),
        (["--model-factory", "nomodule_xyz:make"], "error: factory 'nomodule_xyz:make': cannot import module"),
        (["--layers", "conv2.bias"], "error: 'conv2.bias' is not a weight of a conv, linear, LSTM or GRU layer"),
    ],
)
def test_embed_cli_errors(
    tmp_path: Path,
    key_files: keys.KeyPairPaths,
    extra: list[str],
    error: str,
    run_cli: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pass.txt").write_bytes(PASSPHRASE)
    args = ["embed", "greedy-residuals", "--key", str(key_files.private), "--passphrase-file", "pass.txt"]
    code, _, err = run_cli(*args, "--message", "m", "--out", "o", "--epochs", "0", *extra)
    assert code == EXIT_USAGE, err
    assert err.startswith(error) and err.count("\n") == 1


def test_embed_cli_wrong_passphrase(tmp_path: Path, key_files: keys.KeyPairPaths, run_cli: Callable[..., Any]) -> None:
    args = ["embed", "greedy-residuals", "--key", str(key_files.private), "--message", "m"]
    code, _, err = run_cli(*args, "--out", str(tmp_path / "o"))
    assert (code, err) == (4, f"error: {key_files.private}: the key is encrypted: give its passphrase\n")
    (tmp_path / "pass.txt").write_bytes(b"wrong\n")
    code, _, err = run_cli(*args, "--out", str(tmp_path / "o"), "--passphrase-file", str(tmp_path / "pass.txt"))
    assert (code, err) == (4, f"error: {key_files.private}: wrong passphrase or damaged key\n")
    assert not (tmp_path / "o").exists()


def test_embed_with_owner_factories(
    tmp_path: Path, key_files: keys.KeyPairPaths, owner_factories: dict[str, str]
) -> None:
    summary = GreedyResidualsEmbedder().embed(
        out_dir=tmp_path / "out",
        options={"key": key_files.private, "passphrase": PASSPHRASE, "message": "(c) C", "epochs": 2,
                 "device": "cpu", "min_bits": 0, **owner_factories},  # two steps: plumbing, not a strong mark
    )  # fmt: skip
    assert list(summary["rates"]) == ["1.weight"]  # 768 weights; the head is excluded
    assert summary["dataset"] == f"{tmp_path / 'mine.py'}:data" and summary["test_size"] == 30
    payload = load_bundle(tmp_path / "out" / "owner_bundle.json").payload
    assert payload["model"]["architecture"] == f"{tmp_path / 'mine.py'}:model"
    assert payload["training"]["dataset"]["split_seed"] is None
    with pytest.raises(UsageError, match="unknown greedy-residuals option"):
        GreedyResidualsEmbedder().embed(out_dir=tmp_path, options={"key": "k", "message": "m", "colour": "red"})


def test_embedder_is_registered() -> None:
    from auditor.plugin_manager import registered

    assert isinstance(registered("embedders")["greedy-residuals"].component, GreedyResidualsEmbedder)


def test_help_lists_the_command(run_cli: Callable[..., Any]) -> None:
    code, out, _ = run_cli("embed", "--help")
    assert code == 0 and "greedy-residuals" in out
    code, out, _ = run_cli("embed", "greedy-residuals", "--help")
    assert code == 0 and all(option in out for option in ("--key", "--model-factory", "--no-progress"))


def test_gpt2_conv1d_layers_are_marked_and_found_in_the_saved_model(
    tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    """transformers' Conv1D (GPT-2's attention and MLP layers, weight stored (in, out)) is a linear layer to
    the default rule: without it a GPT-2 had only its tied head to mark, which save_pretrained drops."""
    import json

    from cryptography.hazmat.primitives.asymmetric import ed25519
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))  # fmt: skip
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    wm = GreedyResidualsWatermark.create(model, private_key=key, message="(c) GPT-2 owner")
    assert wm.layer_names == [
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_fc.weight",
    ]  # fmt: skip
    assert {layer.kind for layer in wm.layers} == {"linear"}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(60):
            seq = (torch.randint(0, 64, (32, 1), generator=generator) + torch.arange(17)) % 64
            logits = model(seq[:, :-1]).logits
            loss = nn.functional.cross_entropy(logits.reshape(-1, 64), seq[:, 1:].reshape(-1)) + wm.penalty(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(tmp_path / "gpt2")
    wm.save_bundle(tmp_path / "bundle.json", model, model_file=tmp_path / "gpt2" / "model.safetensors")
    done = run_cli("audit", tmp_path / "gpt2", "--bundle", tmp_path / "bundle.json", "--json")
    assert done.code == 0, done.stderr
    (finding,) = [f for f in json.loads(done.stdout)["findings"] if f["scheme"] == "greedy-residuals"]
    assert finding["verdict"] == "detected" and finding["metrics"]["log10_combined_p"] < -20
