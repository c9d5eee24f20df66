"""The safetensors loader: round trips, shards, hostile files, the CLI on them."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from auditor.audit.load import load_model
from auditor.errors import InputError, UnsafeInputError
from auditor.formats import safetensors as st
from auditor.graph import LayerGraph, LayerKind

ASSETS = Path(__file__).resolve().parents[1] / "assets"
ORDER_NOTE = (
    "the file holds no computation graph: layers are in natural order of their names (safetensors records "
    "no module order, so inferred edges may be wrong), kinds come from parameter names and shapes, "
)


class Tiny(nn.Module):
    """Every layer kind the loader names: conv + batch-norm, depthwise conv, linear, layer-norm,
    embedding, LSTM, GRU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.fc = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.emb = nn.Embedding(20, 16)
        self.lstm = nn.LSTM(16, 12, num_layers=2, bidirectional=True)
        self.gru = nn.GRU(24, 10)


def tiny_state() -> dict[str, torch.Tensor]:
    model = Tiny()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.num_batches_tracked.fill_(3)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def read_all(graph: LayerGraph, *, float32: bool = False) -> dict[str, torch.Tensor]:
    return {t.name: t.read(float32=float32) for layer in graph for t in layer.params.values()}


def problem(path: Path, *, named: Path | None = None) -> str:
    """The problem ``st.load(path)`` reports; the error names ``named`` (default: ``path``)."""
    with pytest.raises(InputError) as info:
        st.load(path)
    assert info.value.path == str(named or path)
    return info.value.problem


def write_st(path: Path, header: object, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# --- round trip -------------------------------------------------------------------------------


def test_round_trip_reads_every_tensor_equal(tmp_path: Path) -> None:
    state = tiny_state()
    save_file(state, tmp_path / "m.safetensors")
    graph = st.load(tmp_path / "m.safetensors")
    assert graph.format == "safetensors"
    assert graph.files == [tmp_path / "m.safetensors"]
    got = read_all(graph)
    assert set(got) == set(state)
    for name, tensor in state.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    assert graph.parameter_count == sum(t.numel() for t in state.values())


def test_round_trip_kinds_and_attributes(tmp_path: Path) -> None:
    save_file(tiny_state(), tmp_path / "m.safetensors")
    graph = st.load(tmp_path / "m.safetensors")
    kinds = {layer.name: layer.kind for layer in graph}
    assert kinds == {
        "bn": LayerKind.BATCH_NORM,
        "conv": LayerKind.CONV2D,
        "dw": LayerKind.CONV2D,
        "emb": LayerKind.EMBEDDING,
        "fc": LayerKind.LINEAR,
        "gru": LayerKind.GRU,
        "ln": LayerKind.LAYER_NORM,
        "lstm": LayerKind.LSTM,
    }
    assert all(layer.attrs["kind_inferred"] for layer in graph)
    lstm, gru = graph.layer("lstm"), graph.layer("gru")
    assert (lstm.attrs["hidden_size"], lstm.attrs["num_layers"], lstm.attrs["bidirectional"]) == (12, 2, True)
    assert (gru.attrs["hidden_size"], gru.attrs["num_layers"], gru.attrs["bidirectional"]) == (10, 1, False)
    assert set(graph.layer("bn").params) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert sum(note.startswith(ORDER_NOTE) for note in graph.notes) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_reads_in_stored_dtype_and_as_float32(tmp_path: Path, dtype: torch.dtype) -> None:
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tiny_state().items()}
    save_file(state, tmp_path / "m.safetensors")
    graph = st.load(tmp_path / "m.safetensors")
    stored, as_float = read_all(graph), read_all(graph, float32=True)
    for name, tensor in state.items():
        assert stored[name].dtype == tensor.dtype, name
        assert torch.equal(stored[name], tensor), name
        assert as_float[name].dtype == torch.float32, name
        assert torch.equal(as_float[name], tensor.float()), name
    weight = graph.layer("conv").weight
    assert weight is not None and weight.dtype == ("float16" if dtype is torch.float16 else "bfloat16")


def test_reading_and_writing_tensors_never_changes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    state = tiny_state()
    save_file(state, path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # a past mtime, so a write would show
    before_bytes, before_stat = path.read_bytes(), path.stat()
    graph = st.load(path)
    for tensor in read_all(graph).values():
        tensor.fill_(42)  # copy-on-write: the page is copied, the file keeps its bytes
    for tensor in read_all(graph, float32=True).values():
        tensor.fill_(-1)
    assert path.read_bytes() == before_bytes
    after = path.stat()
    assert (after.st_mtime_ns, after.st_size) == (before_stat.st_mtime_ns, before_stat.st_size)
    again = read_all(st.load(path))
    assert all(torch.equal(again[k], v) for k, v in state.items())
    assert all(torch.equal(t, state[k]) for k, t in read_all(graph).items())  # a fresh read of the same ref


def test_layers_come_in_natural_name_order(tmp_path: Path) -> None:
    names = ["layer10", "layer2", "layer1", "layer2.sub10", "layer2.sub9", "head"]
    save_file({f"{n}.weight": torch.ones(2, 2) for n in names}, tmp_path / "m.safetensors")
    graph = st.load(tmp_path / "m.safetensors")
    assert [layer.name for layer in graph] == ["head", "layer1", "layer2", "layer2.sub9", "layer2.sub10", "layer10"]


def test_sequential_indices_sort_numerically(tmp_path: Path) -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    graph = st.load(tmp_path / "m.safetensors")
    assert [layer.name for layer in graph] == [str(i) for i in range(12)]
    assert [(e.src, e.dst) for e in graph.edges] == [(str(i), str(i + 1)) for i in range(11)]


def test_natural_key_survives_odd_digits() -> None:
    names = ["a" + "9" * 5000, "a10", "a\u0663", "\u00b2", "a2", "a02"]
    ordered = sorted(names, key=st.natural_key)
    assert ordered[:2] in (["a2", "a02"], ["a02", "a2"])
    assert ordered.index("a10") < ordered.index("a" + "9" * 5000)


def test_metadata_is_kept(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "m.safetensors", metadata={"format": "pt", "owner": "alice"})
    assert st.load(tmp_path / "m.safetensors").metadata == {"format": "pt", "owner": "alice"}


def test_committed_asset_loads() -> None:
    graph = st.load(ASSETS / "st_cnn.safetensors")
    assert [(layer.name, layer.kind) for layer in graph] == [
        ("0", LayerKind.CONV2D),
        ("1", LayerKind.BATCH_NORM),
        ("3", LayerKind.CONV2D),
        ("6", LayerKind.LINEAR),
    ]
    assert graph.metadata == {"format": "pt"}
    assert read_all(graph)["1.num_batches_tracked"].item() == 7


def test_assets_regenerate_byte_for_byte(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_st_assets", ASSETS / "make_st_assets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build(tmp_path)
    assert {p.name for p in built} == {p.name for p in ASSETS.glob("st_*")} - {"make_st_assets.py"}
    for path in built:
        assert path.read_bytes() == (ASSETS / path.name).read_bytes(), path.name
        assert path.stat().st_size < 50_000


# --- sharded folders ----------------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = tiny_state()
    folder = tmp_path / "model"
    folder.mkdir()
    names = sorted(state)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({k: state[k] for k in first}, folder / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in second}, folder / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in second})
    write_index(folder, weight_map)
    return folder, state


def write_index(folder: Path, weight_map: dict[str, str]) -> Path:
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_sharded_folder_loads_every_tensor(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, state = sharded
    graph = load_model(folder)
    assert graph.format == "safetensors"
    assert [f.name for f in graph.files] == [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    got = read_all(graph)
    assert set(got) == set(state)
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert graph.metadata["shards"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert {layer.name: layer.kind for layer in graph}["lstm"] is LayerKind.LSTM


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ("../x.safetensors", "shard points outside the model's folder ('../x.safetensors')"),
        (
            "/etc/passwd",
            "shard points to the absolute path '/etc/passwd'; only files inside the model's folder are read",
        ),
        ("escape.safetensors", "shard 'escape.safetensors' is a link that leaves the model's folder"),
    ],
    ids=["dotdot", "absolute", "symlink"],
)
def test_shard_outside_the_folder_is_unsafe(
    sharded: tuple[Path, dict[str, torch.Tensor]], shard: str, message: str
) -> None:
    folder, state = sharded
    outside = folder.parent / "x.safetensors"
    save_file({"conv.weight": state["conv.weight"]}, outside)
    (folder / "escape.safetensors").symlink_to(outside)
    index = write_index(folder, {"conv.weight": shard})
    with pytest.raises(UnsafeInputError) as info:
        st.load(folder)
    assert (info.value.path, info.value.problem) == (str(index), message)
    with pytest.raises(UnsafeInputError):
        load_model(folder)


def test_index_that_is_a_link_out_of_the_folder_is_unsafe(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "elsewhere.json").write_text('{"weight_map": {}}')
    (folder / "model.safetensors.index.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(UnsafeInputError) as info:
        st.load(folder)
    assert info.value.problem == ("index 'model.safetensors.index.json' is a link that leaves the model's folder")


def test_tensor_mapped_to_the_wrong_shard(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, _ = sharded
    index = write_index(folder, {"conv.weight": "model-00002-of-00002.safetensors"})
    with pytest.raises(InputError) as info:
        st.load(folder)
    assert type(info.value) is InputError
    assert (info.value.path, info.value.problem) == (
        str(index),
        "tensor 'conv.weight' is mapped to 'model-00002-of-00002.safetensors', which does not hold it",
    )


def test_missing_shard(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, _ = sharded
    index = write_index(folder, {"conv.weight": "model-00003-of-00002.safetensors"})
    with pytest.raises(InputError) as info:
        load_model(folder)
    assert type(info.value) is InputError
    assert (info.value.path, info.value.problem) == (
        str(index),
        "shard 'model-00003-of-00002.safetensors' does not exist next to the model",
    )


def test_shard_tensors_the_index_leaves_out_are_noted(sharded: tuple[Path, dict[str, torch.Tensor]]) -> None:
    folder, _ = sharded
    write_index(folder, {"conv.weight": "model-00001-of-00002.safetensors"})
    graph = st.load(folder)
    assert [t.name for layer in graph for t in layer.params.values()] == ["conv.weight"]
    assert (
        "model-00001-of-00002.safetensors: holds 16 tensors the index does not map to it, not loaded (first: 'bn.bias')"
    ) in graph.notes


def test_index_not_json_and_without_weight_map(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{")
    assert problem(tmp_path, named=index) == "the index is not valid JSON (JSONDecodeError)"
    index.write_text('{"weight_map": []}')
    assert problem(tmp_path, named=index) == "has no weight_map of tensor names to shard files"


def test_folder_with_a_single_model_file(tmp_path: Path) -> None:
    save_file({"fc.weight": torch.ones(3, 2)}, tmp_path / "model.safetensors")
    graph = load_model(tmp_path)
    assert [layer.name for layer in graph] == ["fc"]


# --- broken and hostile files ------------------------------------------------------------------


BROKEN = {
    "st_empty.safetensors": "truncated: the header length needs 8 bytes, the file has 0 left",
    "st_truncated_header.safetensors": "truncated: the header length needs 8 bytes, the file has 5 left",
    "st_header_cut.safetensors": "truncated: header claims 776 bytes but the file holds 32 after its length",
    "st_header_too_long.safetensors": "header claims 1000000000000000 bytes, more than the 100000000-byte limit",
    "st_header_not_json.safetensors": "the header is not valid JSON (JSONDecodeError)",
    "st_header_list.safetensors": "the header is not a JSON object",
    "st_truncated_data.safetensors": (
        "truncated: tensor '6.weight' ends at data offset 15984, the file holds 14984 data bytes"
    ),
    "st_size_mismatch.safetensors": "tensor 'w': shape [3, 2] of F32 needs 24 bytes, offsets span 16",
    "st_negative_shape.safetensors": "tensor 'w': shape [-2, 2] is not a list of non-negative integers",
    "st_float_shape.safetensors": "tensor 'w': shape [2.0, 2] is not a list of non-negative integers",
    "st_random.safetensors": "header claims 2173316267845960115 bytes, more than the 100000000-byte limit",
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_asset_exact_message(name: str) -> None:
    assert problem(ASSETS / name) == BROKEN[name]


def test_unsupported_dtype_is_skipped_with_a_note() -> None:
    graph = st.load(ASSETS / "st_unsupported_dtype.safetensors")
    assert [t.name for layer in graph for t in layer.params.values()] == ["fc.weight"]
    assert graph.notes[0] == (
        "st_unsupported_dtype.safetensors: tensor 'fc.scale' has dtype 'F8_E4M3', which auditor does not read; skipped"
    )


def test_deep_nesting_is_an_input_error_not_a_recursion_error(tmp_path: Path) -> None:
    depth = 100_000
    path = write_st(tmp_path / "deep.safetensors", b'{"w":' + b"[" * depth + b"]" * depth + b"}")
    assert problem(path) == "the header is not valid JSON (RecursionError)"
    bare = write_st(tmp_path / "bare.safetensors", b"[" * depth + b"]" * depth)
    assert problem(bare) == "the header is not valid JSON (RecursionError)"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (
            b'{"w": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 4]}}',
            "the header is not valid JSON (ValueError)",
        ),
        (
            b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {}}',
            "the header names the key 'w' twice",
        ),
        (
            {"w": {"dtype": "F32", "shape": [0, 10**30], "data_offsets": [0, 0]}},
            "tensor 'w': shape [0, 1000000000000000000000000000000] is too large to address",
        ),
        (
            {"w": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}},
            "tensor 'w': shape has 65 dimensions, more than 64",
        ),
        (
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
            "tensor 'w': data_offsets [4, 0] are not [begin, end]",
        ),
        (
            {"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
            "tensor 'w': shape [True] is not a list of non-negative integers",
        ),
        ({"w": [1, 2]}, "tensor 'w': entry is not an object"),
        (
            {"__metadata__": [], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            "__metadata__ must map strings to strings",
        ),
        (
            {"x" * 1000: {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
            f"tensor '{'x' * 37}...{'x' * 38}': shape [2] of F32 needs 8 bytes, offsets span 4",
        ),
        (
            b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}\xff',
            "the header is not valid JSON (UnicodeDecodeError)",
        ),
    ],
    ids=[
        "huge-int",
        "duplicate",
        "huge-empty",
        "rank",
        "offsets",
        "bool-shape",
        "entry",
        "metadata",
        "long-name",
        "utf8",
    ],
)
def test_hostile_header_exact_message(tmp_path: Path, header: object, message: str) -> None:
    path = write_st(tmp_path / "h.safetensors", header, bytes(8))
    assert problem(path) == message


def test_dtype_that_is_not_a_string_is_skipped(tmp_path: Path) -> None:
    header = {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}
    path = write_st(tmp_path / "h.safetensors", header, bytes(4))
    graph = st.load(path)
    assert len(graph) == 0
    assert graph.notes[0] == "h.safetensors: tensor 'w' has dtype ['F32'], which auditor does not read; skipped"


def test_hidden_and_shared_bytes_are_noted(tmp_path: Path) -> None:
    header = {
        "a.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        "c.weight": {"dtype": "F32", "shape": [1], "data_offsets": [20, 24]},
    }
    graph = st.load(write_st(tmp_path / "h.safetensors", header, bytes(32)))
    assert graph.notes[:2] == [
        "h.safetensors: 16 data bytes belong to no tensor (a valid file has none)",
        "h.safetensors: 1 tensors share bytes with another tensor (first: 'a.weight' and 'b.weight')",
    ]
    clean = st.load(ASSETS / "st_cnn.safetensors")
    assert not any("belong to no tensor" in n or "share bytes" in n for n in clean.notes)


def test_file_shrunk_after_loading_fails_on_read(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(64)}, path)
    graph = st.load(path)
    path.write_bytes(path.read_bytes()[:-16])
    weight = graph.layer("w").params["w"]
    with pytest.raises(InputError, match=r"tensor 'w' needs bytes \d+\.\.\d+ but m.safetensors holds only"):
        weight.read()


# --- content, not extension --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.onnx", "weights.pt"])
def test_safetensors_under_another_extension_loads_as_safetensors(tmp_path: Path, name: str) -> None:
    shutil.copy(ASSETS / "st_cnn.safetensors", tmp_path / name)
    graph = load_model(tmp_path / name)
    assert graph.format == "safetensors"
    assert len(graph) == 4


def test_random_bytes_named_safetensors_are_refused(tmp_path: Path) -> None:
    shutil.copy(ASSETS / "st_random.safetensors", tmp_path / "x.safetensors")
    with pytest.raises(InputError) as info:
        load_model(tmp_path / "x.safetensors")
    assert info.value.problem.startswith("not a model format auditor recognises (formats: ")
    assert info.value.problem.endswith("it starts with bytes b3 41 89 81 a1 2b 29 1e ce 9f 03 1f da 14 ad 0d")


# --- through the CLI ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["st_truncated_data.safetensors", "st_header_not_json.safetensors", "st_empty.safetensors", "deep"]
)
def test_cli_broken_file_exits_4_with_one_line(tmp_path: Path, name: str, run_cli: Callable[..., Any]) -> None:
    if name == "deep":
        path = write_st(tmp_path / "deep.safetensors", b'{"w":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    else:
        path = ASSETS / name
    result = run_cli("inspect", path)
    assert result.code == 4, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_json_describes_the_file(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    path = tmp_path / "weights.pt"
    shutil.copy(ASSETS / "st_cnn.safetensors", path)
    result = run_cli("inspect", path, "--json")
    assert result.code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "safetensors"
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [layer["name"] for layer in info["layers"]] == ["0", "1", "3", "6"]
    assert [(e["src"], e["dst"], e["via"], e["source"]) for e in info["edges"]] == [
        ("0", "1", [], "inferred"),
        ("1", "3", [], "inferred"),
        ("3", "6", ["Flatten"], "inferred"),
    ]
    assert info["totals"] == {"layers": 4, "parameters": 3995, "bytes": 15984, "edges": 3}
