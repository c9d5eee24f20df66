"""The linear structure attacks (``insert-identity``, ``bn-between``, ``chain``, ``invertible-map``): listed,
in the grid, function-preserving in every file they write, and refusing what they cannot do in one line.

``invertible-map`` needs two linear layers with nothing nonlinear between them, which no built-in
architecture has: it runs here on a SmallCNN whose every 3x3 convolution is followed directly by a 1x1
convolution (named by ``--model-factory``), with randomised batch-norms so that folding shows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from auditor.audit.load import load_model
from auditor.errors import EXIT_USAGE, UsageError
from auditor.plugin_manager import registered
from auditor.plugins.attacks.grid import full_grid
from auditor.toolkit import models as zoo
from auditor.toolkit.modelio import predictor

LINEAR = ("insert-identity", "bn-between", "chain", "invertible-map")
FACTORY = """
from torch import nn
from auditor.toolkit import models as zoo

def cnn():
    m = zoo.SmallCNN()
    for name in ("conv1", "conv2", "conv3"):
        conv = getattr(m, name)
        setattr(m, name, nn.Sequential(conv, nn.Conv2d(conv.out_channels, conv.out_channels, 1, bias=False)))
    return m
"""


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.empty(m.num_features).uniform_(0.5, 2.0, generator=gen)
            m.bias.data = torch.randn(m.num_features, generator=gen)
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.empty(m.num_features).uniform_(0.5, 2.0, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A SmallCNN and the paired SmallCNN (factory ``pair.py:cnn``), batch-norms randomised, as safetensors."""
    out = tmp_path_factory.mktemp("linear_attacks")
    (out / "pair.py").write_text(FACTORY)
    namespace: dict[str, Any] = {}
    exec(compile(FACTORY, str(out / "pair.py"), "exec"), namespace)  # the very code the factory names
    torch.manual_seed(0)
    pair = _randomised(namespace["cnn"](), seed=1)
    plain = _randomised(zoo.build("cnn", seed=2), seed=2)
    for name, model in (("pair", pair), ("plain", plain)):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors"))
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    return SimpleNamespace(out=out, pair=pair, plain=plain, x=x, factory=f"{out / 'pair.py'}:cnn")


def apply(attack: str, model: Path, out: Path, **options: Any) -> dict[str, Any]:
    return registered("attacks")[attack].component.apply(model, out, options={"seed": 1, **options})


def test_listed_and_in_the_grid(run_cli: Callable[..., Any]) -> None:
    code, out, _ = run_cli("attack", "--list")
    assert code == 0
    for attack in LINEAR:
        assert f"{attack}  [function-preserving]" in out
    cells = {c.attack: c for c in full_grid()}
    assert all(cells[a].group == "function-preserving" for a in LINEAR)
    assert [cells[a].suffix for a in LINEAR] == [".onnx", ".onnx", ".onnx", ".safetensors"]


@pytest.mark.parametrize("attack", ["insert-identity", "bn-between", "chain"])
@pytest.mark.parametrize("suffix", [".onnx", ".safetensors", ".pt"])
def test_structural_edits_keep_the_function_in_every_file(
    models: SimpleNamespace, tmp_path: Path, attack: str, suffix: str
) -> None:
    out = tmp_path / f"{attack}{suffix}"
    summary = apply(attack, models.out / "plain.safetensors", out, layers="conv2, head")
    assert summary["edited"] == ["conv2", "head"] and summary["max_output_change"] <= 1e-4
    graph = load_model(out)  # the loaders read every file written
    reference = load_model(models.out / "plain.safetensors")
    extra = {"insert-identity": 2, "bn-between": 4, "chain": 4}[attack]
    if suffix == ".onnx":  # it runs, and computes the original's logits (the export folds batch-norms away)
        run = predictor(out)
        assert run is not None
        with torch.no_grad():
            assert float((run(models.x) - models.plain(models.x)).abs().max()) <= 1e-4
        weighted = [x for x in reference.layers if x.kind.value in ("conv2d", "linear")]
        # The export folds a batch-norm into the convolution before it, not one between two linear layers.
        folded_extra = {"insert-identity": 2, "bn-between": 3, "chain": 4}[attack]
        assert len(graph.layers) == len(weighted) + folded_extra
    else:  # the new layers are there under the module's numbered names
        assert len(graph.layers) == len(reference.layers) + extra
        assert "conv2.1" in graph and "head.1" in graph and "conv2" not in graph


@pytest.mark.parametrize("suffix", [".safetensors", ".onnx"])
def test_invertible_map_keeps_the_function_and_the_names(models: SimpleNamespace, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"mapped{suffix}"
    summary = apply("invertible-map", models.out / "pair.safetensors", out, model_factory=models.factory,
                    condition=100.0)  # fmt: skip
    assert summary["pairs"] == [["conv1.0", "conv1.1"], ["conv2.0", "conv2.1"], ["conv3.0", "conv3.1"]]
    assert summary["max_output_change"] <= 1e-4 and summary["edges_from"].startswith("an ONNX trace")
    run = predictor(out, model_factory=models.factory)
    assert run is not None
    with torch.no_grad():
        assert float((run(models.x) - models.pair(models.x)).abs().max()) <= 1e-4
    if suffix == ".safetensors":
        before, after = load_file(models.out / "pair.safetensors"), load_file(out)
        assert before.keys() == after.keys()
        w, w_mapped = before["conv2.0.weight"].flatten(1).double(), after["conv2.0.weight"].flatten(1).double()
        a = torch.linalg.lstsq(w.T, w_mapped.T).solution.T  # the map that was put in: invertible, not orthogonal
        assert float(torch.linalg.cond(a)) == pytest.approx(100.0, rel=1e-3)
        assert not torch.allclose(a @ a.T, torch.eye(32, dtype=torch.float64), atol=0.1)


def test_invertible_map_picks_pairs(models: SimpleNamespace, tmp_path: Path) -> None:
    source = models.out / "pair.safetensors"
    untouched = (source.read_bytes(), source.stat().st_mtime_ns)
    summary = apply("invertible-map", models.out / "pair.safetensors", tmp_path / "one.safetensors",
                    model_factory=models.factory, pairs="conv2.0")  # fmt: skip
    assert summary["pairs"] == [["conv2.0", "conv2.1"]]
    assert (source.read_bytes(), source.stat().st_mtime_ns) == untouched  # the input is never touched
    before, after = load_file(models.out / "pair.safetensors"), load_file(tmp_path / "one.safetensors")
    assert torch.equal(before["conv1.0.weight"], after["conv1.0.weight"])
    assert not torch.equal(before["conv2.0.weight"], after["conv2.0.weight"])
    with pytest.raises(UsageError, match=r"no pair starts at conv9: pairs: conv1.0 -> conv1.1, conv2.0 -> conv2.1"):
        apply("invertible-map", models.out / "pair.safetensors", tmp_path / "x.safetensors",
              model_factory=models.factory, pairs="conv9")  # fmt: skip


def test_refusals_are_one_line(models: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli("attack", "invertible-map", str(models.out / "plain.safetensors"), "--out", str(out))
    assert code == EXIT_USAGE and not out.exists()
    assert err.startswith("error: ") and "no two linear layers with nothing nonlinear between them" in err
    assert err.count("\n") == 1
    # A map this ill-conditioned changes float32 outputs beyond the tolerance: checked, refused, not written.
    code, _, err = run_cli("attack", "chain", str(models.out / "plain.safetensors"), "--out", str(tmp_path / "c.onnx"),
                           "--param", "condition=1e9")  # fmt: skip
    assert code == EXIT_USAGE and "the edit changed the outputs by" in err and not (tmp_path / "c.onnx").exists()
    code, _, err = run_cli("attack", "chain", str(models.out / "plain.safetensors"), "--out", str(tmp_path / "d.onnx"),
                           "--param", "condition=0.5")  # fmt: skip
    assert code == EXIT_USAGE and err == "error: a condition number is at least 1, not 0.5\n"
