"""``auditor evaluate`` on an owner's own model (a Conv1d over synthetic sequences, which the package
does not ship): the probe input every attack traces and exports the model on comes from the model
or the data factory, never from digits; a failed cell gives its reason in the terminal and the exit
code 3."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from auditor.errors import UsageError
from auditor.plugins.attacks.evaluate import evaluate_model

pytestmark = pytest.mark.usefixtures("one_thread")

SEQUENCES = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


class SequenceNet(nn.Module):
    """Conv1d over 4 channels of 16 steps, batch-norm, a linear layer, a head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(16)
        self.conv2 = nn.Conv1d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(32)
        self.fc1 = nn.Linear(32 * 16, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(torch.relu(self.fc1(torch.flatten(x, 1))))


class DeclaredNet(SequenceNet):
    input_shape = (4, 16)


def model():
    return SequenceNet()


def declared():
    return DeclaredNet()


def data():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(150) % 3
    t = torch.arange(16).float()
    x = 0.3 * torch.randn(150, 4, 16, generator=g) + torch.sin(t * (1 + y.float()).reshape(-1, 1, 1) / 3)
    return TensorDataset(x[:120], y[:120]), TensorDataset(x[120:], y[120:])
'''


@pytest.fixture(scope="module")
def sequence_owner(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Conv1d owner's factories and a Greedy Residuals release of its model."""
    from auditor import keys
    from auditor.plugins.greedy_residuals.embedder import embed_greedy_residuals

    root = tmp_path_factory.mktemp("sequences")
    (root / "sequences.py").write_text(SEQUENCES)
    factories = {"model_factory": f"{root / 'sequences.py'}:model", "data_factory": f"{root / 'sequences.py'}:data"}
    key = keys.generate_keypair(root / "keys", algorithm="ed25519").private
    summary = embed_greedy_residuals(key=key, message="(c) sequences", out_dir=root / "owner", epochs=6,
                                     layers=["conv2.weight"], device="cpu", **factories)  # fmt: skip
    return {"root": root, "summary": summary, "model": root / "owner" / "model.safetensors",
            "bundle": root / "owner" / "owner_bundle.json", **factories}  # fmt: skip


def test_structure_cells_run_on_the_owners_input_shape(sequence_owner: dict[str, Any], tmp_path: Path) -> None:
    """permute and bn-fold trace the model to find its channels: on the data factory's (4, 16)
    sequences (a digits-shaped probe would crash the Conv1d), and the watermark survives both."""
    results = evaluate_model(model=sequence_owner["model"], bundles=[sequence_owner["bundle"]], out_dir=tmp_path,
                             attacks=["permute", "bn-fold"], grid="quick",
                             model_factory=sequence_owner["model_factory"],
                             data_factory=sequence_owner["data_factory"])  # fmt: skip
    cells = {c["attack"]: c for c in results["cells"]}
    assert set(cells) == {"none", "permute", "bn-fold"}
    assert all(c["status"] == "ok" for c in cells.values()), {k: c.get("error") for k, c in cells.items()}
    assert cells["permute"]["summary"]["channels_moved"] > 0
    assert cells["bn-fold"]["summary"]["folded"] == {"bn1": "conv1", "bn2": "conv2"}
    assert cells["none"]["direct"][0]["verdict"] == "detected", cells["none"]["direct"]
    for c in cells.values():  # both keep the function: the accuracy on the owner's 30 test sequences is the same
        assert c["accuracy"] == pytest.approx(sequence_owner["summary"]["test_accuracy"], abs=1e-6)


def test_a_model_that_declares_its_input_is_checked_against_the_data(
    sequence_owner: dict[str, Any], tmp_path: Path
) -> None:
    """A model declaring (4, 16) inputs given no data factory would be fed digits: refused up front."""
    declared = sequence_owner["model_factory"].replace(":model", ":declared")
    with pytest.raises(UsageError, match=r"takes inputs of shape \[4, 16\].*digits.*--data-factory"):
        evaluate_model(model=sequence_owner["model"], bundles=[sequence_owner["bundle"]], out_dir=tmp_path,
                       attacks=["permute"], grid="quick", model_factory=declared)  # fmt: skip


def test_the_model_declares_its_input(sequence_owner: dict[str, Any]) -> None:
    """Without a data factory, a model's own ``input_shape`` is the probe the attacks use."""
    from auditor.toolkit.data import load_factory
    from auditor.toolkit.modelio import read_model, runnable

    declared = sequence_owner["model_factory"].replace(":model", ":declared")
    state = read_model(sequence_owner["model"]).state_dict()
    found = runnable(state, model_factory=declared)
    assert found is not None and found.input_shape == (4, 16)
    plain = runnable(state, model_factory=sequence_owner["model_factory"])
    assert plain is not None and plain.input_shape == (1, 8, 8)  # nothing declared, no data: the default
    assert load_factory(declared)().input_shape == (4, 16)


def test_a_failed_cell_is_printed_with_its_reason_and_exits_3(
    sequence_owner: dict[str, Any], tmp_path: Path, plugin: Any, run_cli: Callable[..., Any]
) -> None:
    from auditor import hookimpl
    from auditor.bases import Attack

    class Broken(Attack):
        id = "test-broken"
        grid = ({"label": "broken attack", "group": "breaking"},)

        def apply(self, model: Any, out: Any, *, options: Any) -> dict[str, Any]:
            raise RuntimeError("the attack fell over")

    class Plugin:
        @hookimpl
        def register_attacks(self, register: Any) -> None:
            register(Broken())

    args = ["evaluate", "--model", sequence_owner["model"], "--bundle", sequence_owner["bundle"],
            "--model-factory", sequence_owner["model_factory"], "--data-factory", sequence_owner["data_factory"],
            "--no-progress"]  # fmt: skip
    with plugin(Plugin(), "test-broken"):
        failed = run_cli(*args, "--attacks", "test-broken", "--out", tmp_path / "a", "--grid", "full")
        failed_json = run_cli(*args, "--attacks", "test-broken", "--out", tmp_path / "b", "--grid", "full", "--json")
    assert failed.code == 3, failed.stderr
    assert "error: cell broken attack: RuntimeError: the attack fell over" in failed.stderr
    assert "1 of 2 cells failed (exit 3)" in failed.stderr
    assert failed_json.code == 3
    assert json.loads(failed_json.stdout)["failed"] == [
        {"cell": "broken attack", "reason": "RuntimeError: the attack fell over"}
    ]
    passed = run_cli(*args, "--attacks", "permute", "--out", tmp_path / "c", "--grid", "quick")
    assert passed.code == 0, passed.stderr
    assert "error:" not in passed.stderr


def test_an_attack_that_does_not_apply_is_not_a_failure(
    sequence_owner: dict[str, Any], tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    """invertible-map needs two linear layers in a row; the owner's Conv1d model has none: its cell says so
    and the evaluation still exits 0."""
    out = tmp_path / "eval"
    done = run_cli("evaluate", "--model", sequence_owner["model"], "--bundle", sequence_owner["bundle"],
                   "--model-factory", sequence_owner["model_factory"], "--data-factory", sequence_owner["data_factory"],
                   "--no-progress", "--attacks", "invertible-map", "--out", out, "--grid", "full",
                   "--json")  # fmt: skip
    assert done.code == 0, done.stderr
    cells = {c["attack"]: c for c in json.loads((out / "robustness.json").read_text())["cells"]}
    assert cells["invertible-map"]["status"] == "n/a"
    assert "no two linear layers" in cells["invertible-map"]["why"]
    assert json.loads(done.stdout)["failed"] == []


TOKENS = """
import torch
from torch import nn


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8 * 6, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, ids):
        return self.head(torch.relu(self.fc1(torch.flatten(self.embed(ids), 1))))


def model():
    return TokenNet()
"""


def test_the_probe_keeps_the_datas_dtype(tmp_path: Path) -> None:
    """Token ids (int64) from the data factory reach the export as int64: a float probe would fail."""
    import torch
    from safetensors.torch import save_file

    from auditor.audit.load import load_model
    from auditor.toolkit.data import load_factory
    from auditor.toolkit.modelio import export_onnx, read_model, runnable
    from auditor.toolkit.models import probe_input

    (tmp_path / "tokens.py").write_text(TOKENS)
    factory = f"{tmp_path / 'tokens.py'}:model"
    torch.manual_seed(0)
    save_file(load_factory(factory)().state_dict(), str(tmp_path / "m.safetensors"))
    state = read_model(tmp_path / "m.safetensors").state_dict()
    with probe_input((6,), torch.int64):
        found = runnable(state, model_factory=factory)
    assert found is not None and (found.input_shape, found.input_dtype) == ((6,), torch.int64)
    export_onnx(found, tmp_path / "m.onnx")
    assert {layer.name for layer in load_model(tmp_path / "m.onnx").layers} >= {"fc1", "head"}
    outside = runnable(state, model_factory=factory)  # the context is gone: the default again
    assert outside is not None and outside.input_dtype == torch.float32
