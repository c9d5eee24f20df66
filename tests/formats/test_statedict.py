"""Kind inference and inferred edges (auditor/formats/_statedict.py), through safetensors files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from auditor.formats import safetensors as st
from auditor.formats.statedict import graph_from_tensors, infer_kind, split_key
from auditor.graph import EdgeSource, LayerGraph, LayerKind, TensorRef


def through_file(tmp_path: Path, state: dict[str, torch.Tensor]) -> LayerGraph:
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return st.load(path)


def edges(graph: LayerGraph) -> list[tuple[str, str, tuple[str, ...], int | None, EdgeSource]]:
    return [(e.src, e.dst, e.via, e.offset, e.source) for e in graph.edges]


def test_split_key() -> None:
    assert split_key("layer1.0.conv1.weight") == ("layer1.0.conv1", "weight")
    assert split_key("bias") == ("bias", "bias")


def test_sequential_cnn_kinds_and_chain(tmp_path: Path) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    graph = through_file(tmp_path, model.state_dict())
    assert [(layer.name, layer.kind) for layer in graph] == [
        ("0", LayerKind.CONV2D),
        ("1", LayerKind.BATCH_NORM),
        ("3", LayerKind.CONV2D),
        ("6", LayerKind.LINEAR),
    ]
    assert edges(graph) == [
        ("0", "1", (), 0, EdgeSource.INFERRED),
        ("1", "3", (), 0, EdgeSource.INFERRED),
        ("3", "6", ("Flatten",), 0, EdgeSource.INFERRED),
    ]
    assert graph.edge_source is EdgeSource.INFERRED
    assert graph.notes[-1].endswith("edges are inferred from matching widths")
    assert (graph.layer("3").in_channels, graph.layer("3").out_channels) == (8, 16)
    assert (graph.layer("6").in_channels, graph.layer("6").out_channels) == (256, 10)


def test_depthwise_conv_gets_inferred_groups(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1))
    graph = through_file(tmp_path, model.state_dict())
    dw = graph.layer("1")
    assert dw.kind is LayerKind.CONV2D
    assert dw.attrs["groups_inferred"] == 8
    assert "groups" not in dw.attrs  # the file does not record it
    assert (dw.in_channels, dw.out_channels) == (8, 8)
    assert "groups_inferred" not in graph.layer("2").attrs
    assert edges(graph) == [("0", "1", (), 0, EdgeSource.INFERRED), ("1", "2", (), 0, EdgeSource.INFERRED)]


def test_grouped_conv_groups_inferred(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv1d(4, 12, 3), nn.Conv1d(12, 6, 3, groups=3))
    graph = through_file(tmp_path, model.state_dict())
    assert [layer.kind for layer in graph] == [LayerKind.CONV1D, LayerKind.CONV1D]
    assert graph.layer("1").attrs["groups_inferred"] == 3
    assert graph.layer("1").in_channels == 12


def test_no_consistent_widths_leaves_edges_absent(tmp_path: Path) -> None:
    state = {"a.weight": torch.ones(5, 3), "b.weight": torch.ones(7, 9), "c.weight": torch.ones(4, 11)}
    graph = through_file(tmp_path, state)
    assert [layer.kind for layer in graph] == [LayerKind.LINEAR] * 3
    assert graph.edges == []
    assert graph.edge_source is EdgeSource.ABSENT
    assert graph.notes[-1].endswith("and no edges could be inferred")


def test_partial_chain_keeps_the_edges_that_fit(tmp_path: Path) -> None:
    state = {"a.weight": torch.ones(5, 3), "b.weight": torch.ones(7, 5), "c.weight": torch.ones(4, 11)}
    graph = through_file(tmp_path, state)
    assert edges(graph) == [("a", "b", (), 0, EdgeSource.INFERRED)]
    assert graph.edge_source is EdgeSource.INFERRED


def test_kinds_from_names_and_shapes(tmp_path: Path) -> None:
    state = {
        "embed_tokens.weight": torch.ones(50, 8),
        "encoder.bn.weight": torch.ones(8),
        "encoder.bn.bias": torch.ones(8),
        "encoder.norm.weight": torch.ones(8),
        "encoder.norm.bias": torch.ones(8),
        "head.weight": torch.ones(3, 8),
        "head.bias": torch.ones(3),
        "pos_emb.weight": torch.ones(10, 8),
        "pos_emb.bias": torch.ones(8),  # a bias: not an embedding after all
        "scale": torch.ones(()),
        "stats.running_mean": torch.zeros(8),
        "stats.running_var": torch.ones(8),
    }
    graph = through_file(tmp_path, state)
    kinds = {layer.name: layer.kind for layer in graph}
    assert kinds == {
        "embed_tokens": LayerKind.EMBEDDING,
        "encoder.bn": LayerKind.BATCH_NORM,
        "encoder.norm": LayerKind.LAYER_NORM,
        "head": LayerKind.LINEAR,
        "pos_emb": LayerKind.LINEAR,
        "scale": LayerKind.OTHER,
        "stats": LayerKind.BATCH_NORM,
    }
    assert graph.layer("embed_tokens").out_channels == 8
    assert all(layer.attrs["kind_inferred"] is True for layer in graph)


def test_recurrent_layers(tmp_path: Path) -> None:
    state = {
        **{f"rnn.{k}": v for k, v in nn.LSTM(6, 5, num_layers=3, bidirectional=True).state_dict().items()},
        **{f"z.{k}": v for k, v in nn.GRU(10, 4).state_dict().items()},
    }
    graph = through_file(tmp_path, state)
    lstm, gru = graph.layer("rnn"), graph.layer("z")
    assert lstm.kind is LayerKind.LSTM
    assert lstm.attrs == {"num_layers": 3, "bidirectional": True, "hidden_size": 5, "kind_inferred": True}
    assert (lstm.in_channels, lstm.out_channels) == (6, 10)
    assert gru.kind is LayerKind.GRU
    assert (gru.attrs["hidden_size"], gru.attrs["num_layers"], gru.attrs["bidirectional"]) == (4, 1, False)


def test_recurrent_layers_are_chained(tmp_path: Path) -> None:
    state = {
        **{f"a.{k}": v for k, v in nn.Linear(3, 6).state_dict().items()},
        **{f"rnn.{k}": v for k, v in nn.LSTM(6, 5, bidirectional=True).state_dict().items()},
        **{f"z.{k}": v for k, v in nn.GRU(10, 4).state_dict().items()},
    }
    graph = through_file(tmp_path, state)
    # 6 features feed the LSTM; its 2 x 5 outputs feed the GRU's 10 inputs
    assert edges(graph) == [("a", "rnn", (), 0, EdgeSource.INFERRED), ("rnn", "z", (), 0, EdgeSource.INFERRED)]


def test_recurrent_shapes_that_fit_neither_gate_count() -> None:
    params = {
        "weight_ih_l0": TensorRef.from_tensor("w", torch.ones(10, 6)),
        "weight_hh_l0": TensorRef.from_tensor("h", torch.ones(10, 5)),
    }
    kind, attrs = infer_kind("rnn", params)
    assert kind is LayerKind.OTHER
    assert attrs == {"num_layers": 1, "bidirectional": False, "hidden_size": 5}


def test_kind_hints_win_and_are_not_marked_inferred() -> None:
    refs = [("block.weight", TensorRef.from_tensor("block.weight", torch.ones(4, 4)))]
    graph = graph_from_tensors("x", Path("x"), refs, files=[], kind_hints={"block": LayerKind.EMBEDDING})
    assert graph.layer("block").kind is LayerKind.EMBEDDING
    assert "kind_inferred" not in graph.layer("block").attrs


@pytest.mark.parametrize(
    "state",
    [
        {"a.weight": torch.ones(0, 5), "b.weight": torch.ones(4, 3, 1, 1)},
        {"a.weight": torch.ones(0, 5, 1, 1), "b.weight": torch.ones(4, 3)},
    ],
    ids=["linear-conv", "conv-linear"],
)
def test_zero_width_layer_feeds_nothing(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    graph = through_file(tmp_path, state)
    assert graph.edges == []
    assert graph.edge_source is EdgeSource.ABSENT


def test_scalar_recurrent_weight_is_not_a_crash(tmp_path: Path) -> None:
    graph = through_file(tmp_path, {"r.weight_ih_l0": torch.zeros(()), "r.weight_hh_l0": torch.zeros(4, 1)})
    assert graph.layer("r").kind is LayerKind.OTHER
