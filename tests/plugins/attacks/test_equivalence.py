"""The equivalent-structure attacks (split-outputs, split-inputs, neuron-clique, neuron-split): listed with
their options, written as files the loaders read (branch names in safetensors; Concat, or Split and Add, in
ONNX; a wider built-in for dummy units), refused with one line when asked the impossible, and run by the
evaluation grid, which measures that the function is kept and that restore gives the watermark back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import onnx
import pytest
import torch
from safetensors.torch import load_file

from auditor.errors import EXIT_USAGE
from auditor.plugin_manager import registered
from auditor.plugins.attacks.evaluate import evaluate_model
from auditor.plugins.attacks.grid import full_grid
from auditor.toolkit.modelio import predictor

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = ("neuron-clique", "neuron-split", "split-inputs", "split-outputs")


def attack(aid: str, model: Path, out: Path, **options: Any) -> dict[str, Any]:
    summary: dict[str, Any] = registered("attacks")[aid].component.apply(model, out, options={"seed": 3, **options})
    return summary


def test_listed_with_their_options(run_cli: Callable[..., Any]) -> None:
    code, out, _ = run_cli("attack", "--list", "--json")
    rows = {r["id"]: r for r in json.loads(out)}
    assert code == 0
    options = {aid: {o["name"] for o in rows[aid]["options"]} for aid in IDS}
    assert all(rows[aid]["function_preserving"] for aid in IDS)
    assert {"layers", "k"} <= options["split-outputs"] and {"layers", "k"} <= options["split-inputs"]
    assert {"layers", "dummies", "group"} <= options["neuron-clique"]
    assert {"layers", "units", "parts"} <= options["neuron-split"]
    cells = {c.attack: c for c in full_grid() if c.attack in IDS}
    assert sorted(cells) == sorted(IDS) and {c.group for c in cells.values()} == {"function-preserving"}
    assert cells["split-outputs"].suffix == ".onnx" and cells["neuron-clique"].suffix == ".safetensors"


def _change(path: Path, owner: SimpleNamespace) -> float:
    run = predictor(path)
    assert run is not None
    x = owner.data.test.tensors[0]
    with torch.no_grad():
        return float((run(x) - owner.model(x)).abs().max())


def test_split_outputs_writes_branch_names_and_a_concat(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    summary = attack("split-outputs", gr_owner.files["safetensors"], tmp_path / "s.safetensors", k=3,
                     layers="conv2, head")  # fmt: skip
    state = load_file(tmp_path / "s.safetensors")
    assert summary["split"] == ["conv2", "head"] and summary["max_output_change"] <= 1e-4
    assert sum(state[f"conv2.{i}.weight"].shape[0] for i in range(3)) == 32 and "conv3.weight" in state
    attack("split-outputs", gr_owner.files["pt"], tmp_path / "s.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "s.onnx")).graph.node]
    assert ops.count("Concat") >= 4 and ops.count("Conv") == 6  # three convolutions, two branches each
    assert _change(tmp_path / "s.onnx", gr_owner) <= 1e-4


def test_split_inputs_writes_a_split_and_an_add(gr_owner: SimpleNamespace, tmp_path: Path) -> None:
    summary = attack("split-inputs", gr_owner.files["safetensors"], tmp_path / "s.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "s.onnx")).graph.node]
    assert summary["split"] == ["conv2", "conv3", "head"]  # conv1 reads one channel
    assert "Split" in ops and ops.count("Add") >= 3
    assert _change(tmp_path / "s.onnx", gr_owner) <= 1e-4


@pytest.mark.parametrize(("aid", "options", "widths"), [
    ("neuron-clique", {"dummies": 3, "group": 2}, {"conv1": 20, "conv2": 36, "conv3": 68}),
    ("neuron-split", {"units": 5, "parts": 3, "layers": "conv2"}, {"conv1": 16, "conv2": 42, "conv3": 64}),
])  # fmt: skip
def test_neuron_attacks_write_a_wider_model_that_runs(
    gr_owner: SimpleNamespace, tmp_path: Path, aid: str, options: dict[str, Any], widths: dict[str, int]
) -> None:
    out = tmp_path / "n.safetensors"
    attack(aid, gr_owner.files["safetensors"], out, **options)
    state = load_file(out)
    assert {name: state[f"{name}.weight"].shape[0] for name in widths} == widths
    assert _change(out, gr_owner) <= 1e-4


@pytest.mark.parametrize(("args", "message"), [
    (("split-outputs", "-p", "k=1"), "error: a layer splits into at least 2 branches, not 1\n"),
    (("neuron-clique", "-p", "layers=head"), "error: cannot add dummy units to head: hidden layers"),
    (("split-inputs", "-p", "layers=conv1"), "error: cannot split into 2 input groups conv1: layers that can be"),
])  # fmt: skip
def test_impossible_requests_are_one_line(
    gr_owner: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any], args: tuple[str, ...], message: str
) -> None:
    code, out, err = run_cli("attack", args[0], str(gr_owner.files["safetensors"]), "--out",
                             str(tmp_path / "x.safetensors"), *args[1:])  # fmt: skip
    assert code == EXIT_USAGE and err.startswith(message) and err.count("\n") == 1 and out == ""


def test_the_grid_checks_the_function_and_restore_finds_the_watermark(
    gr_owner: SimpleNamespace, tmp_path: Path
) -> None:
    model = gr_owner.files["safetensors"]
    results = evaluate_model(model=model, bundles=[gr_owner.out / "owner_bundle.json"], reference=model,
                             attacks=list(IDS), out_dir=tmp_path / "eval")  # fmt: skip
    cells = {c["attack"]: c for c in results["cells"] if c["attack"] in IDS}
    assert sorted(cells) == sorted(IDS)
    for aid, cell in cells.items():
        assert cell["status"] == "ok", cell.get("error")
        assert cell["max_output_change"] is not None and cell["max_output_change"] <= 1e-4, aid
        acted = {e["restorer"] for e in cell["restore"] if e["acted"]}
        assert ("restore-branches" if aid.startswith("split") else "restore-dummies") in acted, cell["restore"]
        verdicts = {f["detector"]: f["verdict"] for f in cell["restored"]}
        assert verdicts["greedy-residuals"] == "detected", (aid, cell["restored"])
