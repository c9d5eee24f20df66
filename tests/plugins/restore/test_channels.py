"""Channel spaces and the pure channel operations, on a tiny untrained network (no training: fast).

The network has a residual add (two producers share one space), a
concatenation (two spaces arrive at one reader at different offsets) and a
flatten into a linear layer (each channel is a block of features), exported
to ONNX so that its graph is real.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.bases import Restorer
from auditor.errors import UsageError
from auditor.graph import LayerGraph
from auditor.plugins.restore import factors
from auditor.plugins.restore.align import align_layers
from auditor.plugins.restore.plugin import ChannelRestorer, FoldRestorer, ScaleRestorer
from auditor.plugins.restore.similarity import abs_cosine, assign, masked_abs_cosine
from auditor.toolkit import edits as attacks
from auditor.toolkit.channels import (
    Consumer,
    apply_channel_maps,
    channel_spaces,
    graph_with_tensors,
    tensors_of,
)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 4, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(10 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv1(x)))
        r = torch.relu(a + self.bn2(self.conv2(a)))  # residual add: conv1 and conv2 share a space
        c = torch.relu(self.bn3(self.conv3(r)))
        h = torch.cat([r, c], dim=1)  # concatenation: conv3's channels arrive at offset 6
        return self.fc(torch.flatten(nn.functional.max_pool2d(h, 2), 1))  # 16 features per channel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tiny, LayerGraph]:
    torch.manual_seed(3)
    model = Tiny()
    with torch.no_grad():  # batch-norm statistics that are not the identity, so that they must follow
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
    model.eval()
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, do_constant_folding=False)
    return model, load_model(path)


def with_state(model: nn.Module, tensors: dict[str, dict[str, torch.Tensor]]) -> nn.Module:
    """A copy of ``model`` with the weights in ``tensors`` (counters the ONNX graph lacks are kept)."""
    edited = copy.deepcopy(model)
    state = edited.state_dict()
    for key, value in state.items():
        module, _, role = key.rpartition(".")
        if role in tensors.get(module, {}):
            state[key] = tensors[module][role].to(value.dtype)
    edited.load_state_dict(state)
    return edited


def fingerprint(graph: LayerGraph) -> dict[str, Any]:
    """Everything about a graph that a restorer could change, values included."""
    values = {f"{x.name}.{r}": ref.read().clone() for x in graph.layers for r, ref in x.params.items()}
    return {"describe": graph.describe(), "values": values, "ids": [id(x) for x in graph.layers]}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["describe"] == b["describe"]
        and a["ids"] == b["ids"]
        and a["values"].keys() == b["values"].keys()
        and all(torch.equal(a["values"][k], b["values"][k]) for k in a["values"])
    )


def test_spaces_follow_the_residual_add_the_concatenation_and_the_flatten(tiny: tuple[Tiny, LayerGraph]) -> None:
    _, graph = tiny
    spaces = {tuple(sp.producers): sp for sp in channel_spaces(graph)}
    shared = spaces[("conv1", "conv2")]
    assert shared.passthrough == ["bn1", "bn2"] and not shared.frozen
    assert set(shared.consumers) == {Consumer("conv2", 0, 1), Consumer("conv3", 0, 1), Consumer("fc", 0, 16)}
    assert spaces[("conv3",)].consumers == [Consumer("fc", 6 * 16, 16)]
    assert "model's output" in spaces[("fc",)].frozen


def test_a_permutation_keeps_the_outputs(tiny: tuple[Tiny, LayerGraph]) -> None:
    model, graph = tiny
    permuted, maps = attacks.permute(graph, tensors_of(graph), seed=1)
    assert all(not torch.equal(index, torch.arange(len(index))) for index in maps.values())
    edited = with_state(model, permuted)
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        assert float((edited(x) - model(x)).abs().max()) < 1e-5
    assert not torch.equal(edited.conv2.weight, model.conv2.weight)


def test_restore_undoes_a_permutation_exactly(tiny: tuple[Tiny, LayerGraph]) -> None:
    _, graph = tiny
    permuted, _ = attacks.permute(graph, tensors_of(graph), seed=2)
    suspect = graph_with_tensors(graph, permuted)
    restored, log = ChannelRestorer().restore(suspect, graph)
    assert log["acted"] and log["evidence"]["derived"]
    rows = {row["name"]: row for row in log["layers"]}
    assert rows["conv2"]["moved"] > 0 and rows["conv2"]["similarity_after"] == pytest.approx(1.0)
    for layer in graph.layers:
        for role, ref in layer.params.items():
            assert torch.equal(restored.layer(layer.name).params[role].read(), ref.read()), (layer.name, role)


def test_padding_and_dropping(tiny: tuple[Tiny, LayerGraph]) -> None:
    _, graph = tiny
    tensors = tensors_of(graph)
    space = next(sp for sp in channel_spaces(graph) if sp.producers == ["conv3"])
    index = torch.tensor([2, -1, 0])  # channel 3 dropped, channel 1 replaced by a zero channel
    out = apply_channel_maps(graph, tensors, [space], {space.id: index})
    assert out["conv3"]["weight"].shape == (3, 6, 3, 3)
    assert torch.equal(out["conv3"]["weight"][0], tensors["conv3"]["weight"][2])
    assert not out["conv3"]["weight"][1].any() and float(out["conv3"]["bias"][1]) == 0.0
    assert float(out["bn3"]["running_var"][1]) == 1.0 and float(out["bn3"]["weight"][1]) == 0.0
    fc = out["fc"]["weight"]
    assert fc.shape == (5, 96 + 3 * 16)
    assert torch.equal(fc[:, :96], tensors["fc"]["weight"][:, :96])  # the other space's block is untouched
    assert torch.equal(fc[:, 96:112], tensors["fc"]["weight"][:, 96 + 32 : 96 + 48])
    assert not fc[:, 112:128].any()


def test_bad_maps_are_usage_errors(tiny: tuple[Tiny, LayerGraph]) -> None:
    _, graph = tiny
    spaces = channel_spaces(graph)
    conv3 = next(sp for sp in spaces if sp.producers == ["conv3"])
    with pytest.raises(UsageError, match=r"^channel map of conv3 names a channel outside 0\.\.3$"):
        apply_channel_maps(graph, tensors_of(graph), spaces, {conv3.id: torch.tensor([0, 4])})
    fc = next(sp for sp in spaces if sp.producers == ["fc"])
    with pytest.raises(UsageError, match=r"^channel space of fc is frozen: no layer is known to read it"):
        apply_channel_maps(graph, tensors_of(graph), spaces, {fc.id: torch.arange(5)})
    with pytest.raises(UsageError, match="must produce a free channel space"):
        attacks.expand(graph, tensors_of(graph), "fc", 2, seed=0)


def test_inputs_are_never_changed(tiny: tuple[Tiny, LayerGraph]) -> None:
    _, graph = tiny
    tensors = tensors_of(graph)
    kept = {k: {r: t.clone() for r, t in v.items()} for k, v in tensors.items()}
    permuted, _ = attacks.permute(graph, tensors, seed=3)
    scaled = attacks.negate(graph, attacks.scale(graph, permuted, seed=4), seed=5)
    assert all(torch.equal(tensors[k][r], kept[k][r]) for k in kept for r in kept[k])
    suspect = graph_with_tensors(graph, scaled)
    before = {"suspect": fingerprint(suspect), "reference": fingerprint(graph)}
    restored, log = run_restorers(suspect, graph, restorers=[ChannelRestorer(), FoldRestorer(), ScaleRestorer()])
    assert [e["status"] for e in log] == ["ok", "ok", "ok"] and log[0]["log"]["acted"] and log[2]["log"]["acted"]
    assert same(before["suspect"], fingerprint(suspect)) and same(before["reference"], fingerprint(graph))
    assert restored is not suspect
    assert not {id(x) for x in restored.layers} & {id(x) for x in suspect.layers}


def test_run_restorers_isolates_a_failing_restorer(tiny: tuple[Tiny, LayerGraph]) -> None:
    _, graph = tiny

    class Broken(Restorer):
        id = "test-broken"
        order = 25  # between channels (20) and fold (30)
        description = "always fails"

        def restore(self, suspect: LayerGraph, reference: LayerGraph) -> tuple[LayerGraph, dict[str, Any]]:
            raise RuntimeError("no luck")

    permuted, _ = attacks.permute(graph, tensors_of(graph), seed=6)
    suspect = graph_with_tensors(graph, permuted)
    restored, log = run_restorers(suspect, graph, restorers=[ScaleRestorer(), Broken(), ChannelRestorer()])
    assert [(e["restorer"], e["status"]) for e in log] == [
        ("restore-channels", "ok"), ("test-broken", "error"), ("restore-scale", "ok"),
    ]  # fmt: skip
    assert log[1]["error"] == "RuntimeError: no luck"
    assert torch.equal(restored.layer("conv2").params["weight"].read(), graph.layer("conv2").params["weight"].read())


def test_layers_are_paired_by_shape_and_order_not_by_name(tiny: tuple[Tiny, LayerGraph], tmp_path: Path) -> None:
    model, graph = tiny
    path = tmp_path / "renamed.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # constant folding renames the convolutions and drops batch-norm
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, do_constant_folding=True)
    folded = load_model(path)
    pairs = align_layers(folded, graph).pairs
    convs = [x.name for x in folded.layers if x.kind.value == "conv2d"]
    assert convs != ["conv1", "conv2", "conv3"]  # renamed by the exporter
    assert [pairs[c] for c in convs] == ["conv1", "conv2", "conv3"]


def test_assignment_is_one_to_one_and_rectangular() -> None:
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.95, 0.2, 0.1]])  # 2 suspect channels, 3 reference channels
    index, pair = assign(sim, min_pair=0.5)
    assert index.tolist() == [1, 0, -1]  # greedy would give both suspect channels to reference channel 0
    assert pair.tolist() == pytest.approx([0.95, 0.8, 0.0])
    index, _ = assign(torch.tensor([[0.9], [0.3]]).T, min_pair=0.5)  # 1 suspect, 2 reference: 0.3 is no pair
    assert index.tolist() == [0, -1]


def test_zeros_are_no_evidence_of_match_or_scale() -> None:
    """A pruned row matches its own reference row at exactly 1 and keeps factor 1; dense rows
    compare as with the plain |cosine|; a scaled pruned row gives its scale."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 40, generator=gen)
    pruned = ref * (torch.rand(6, 40, generator=gen) > 0.8)  # about 80% zeroed
    masked = masked_abs_cosine(pruned, ref)
    assert torch.allclose(masked.diagonal(), torch.ones(6))
    assert float(masked.diagonal().min()) > float((masked - torch.eye(6) * 9).max())  # itself beats the rest
    assert float(abs_cosine(pruned, ref).diagonal().max()) < 0.9  # plainly compared, pruning looks like a change
    dense = torch.randn(6, 40, generator=gen)
    assert torch.allclose(masked_abs_cosine(dense, ref), abs_cosine(dense, ref), atol=1e-6)
    assert torch.allclose(factors.least_squares_factors(pruned, ref), torch.ones(6, dtype=torch.float64))
    scale = torch.tensor([0.5, 2.0, -1.0, 3.0, 1.0, 0.25])
    got = factors.least_squares_factors(pruned * scale[:, None], ref)
    assert torch.allclose(got, scale.to(torch.float64), atol=1e-6)
    reader = torch.randn(8, 5, 9, generator=gen)  # a reader's weights: rows x input channels x kernel
    d = torch.tensor([0.5, 2.0, 1.0, 4.0, 0.8])
    pruned_reader = reader * d[None, :, None] * (torch.rand(8, 5, 9, generator=gen) > 0.7)
    assert torch.allclose(factors.column_factors(pruned_reader, reader), d.to(torch.float64), rtol=1e-5)


def test_quantised_onnx_layers_pair_with_their_modules_by_scope(tmp_path: Path) -> None:
    """onnxruntime's quantize_dynamic names the ConvInteger nodes ``/layer1/conv1/Conv_quant``; a reference read
    from safetensors lists its layers by name (``head``, ``layer1.conv1``, ..., ``stem``), so order and widths
    alone pair a ResNet's equal-width convolutions crosswise: the scope must still count as the name."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from safetensors.torch import save_file

    from auditor.toolkit.modelio import export_onnx
    from auditor.toolkit.models import build
    from auditor.toolkit.recognise import Runnable

    model = build("resnet", seed=3).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "reference.safetensors")
    export_onnx(Runnable(model, "resnet", (1, 8, 8)), tmp_path / "float.onnx")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "int8.onnx"), weight_type=QuantType.QInt8)
    suspect, reference = load_model(tmp_path / "int8.onnx"), load_model(tmp_path / "reference.safetensors")
    assert align_layers(suspect, reference).pairs == {
        "/stem/Conv_quant": "stem", "/layer1/conv1/Conv_quant": "layer1.conv1",
        "/layer1/conv2/Conv_quant": "layer1.conv2", "/layer2/conv1/Conv_quant": "layer2.conv1",
        "/layer2/shortcut/shortcut.0/Conv_quant": "layer2.shortcut.0", "/layer2/conv2/Conv_quant": "layer2.conv2",
        "head": "head",
    }  # fmt: skip
