"""The PyTorch loader: round trips, laziness, refusal of pickled code, broken and hostile files."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from auditor.audit.load import detect_format, load_model
from auditor.errors import InputError, UnsafeInputError
from auditor.formats import pytorch
from auditor.graph import LayerKind

ASSETS = Path(__file__).resolve().parents[1] / "assets"
_spec = importlib.util.spec_from_file_location("make_pt_assets", ASSETS / "make_pt_assets.py")
assert _spec is not None and _spec.loader is not None
assets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(assets)


class RichNet(nn.Module):
    """Every layer kind the loader must name: conv (plain, grouped, depthwise), norms, embedding, RNNs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8)
        self.fc = nn.Linear(8, 6)
        self.ln = nn.LayerNorm(6)
        self.emb = nn.Embedding(10, 6)
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.gru = nn.GRU(5, 4, batch_first=True)
        self.head = nn.Sequential(nn.Linear(4, 2))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        feats = self.depthwise(self.grouped(torch.relu(self.bn(self.conv(x))))).mean((2, 3))
        seq = self.ln(self.fc(feats)).unsqueeze(1) + self.emb(tokens)
        out, _ = self.lstm(seq)
        out, _ = self.gru(out)
        return self.head(out[:, -1])


RICH_KINDS = {
    "conv": LayerKind.CONV2D,
    "bn": LayerKind.BATCH_NORM,
    "grouped": LayerKind.CONV2D,
    "depthwise": LayerKind.CONV2D,
    "fc": LayerKind.LINEAR,
    "ln": LayerKind.LAYER_NORM,
    "emb": LayerKind.EMBEDDING,
    "lstm": LayerKind.LSTM,
    "gru": LayerKind.GRU,
    "head.0": LayerKind.LINEAR,
}


def rich_model() -> RichNet:
    torch.manual_seed(1)
    model = RichNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model


def tensors(graph) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {t.name: t.read() for layer in graph for t in layer.params.values()}


def assert_same(graph, reference: dict[str, torch.Tensor]) -> None:  # type: ignore[no-untyped-def]
    got = tensors(graph)
    assert list(got) == list(reference)
    for name, value in reference.items():
        assert got[name].dtype == value.dtype, name
        assert torch.equal(got[name], value), name


def kinds(graph) -> dict[str, LayerKind]:  # type: ignore[no-untyped-def]
    return {layer.name: layer.kind for layer in graph}


def write_zip(path: Path, entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, body in entries.items():
            zf.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), body, compress_type=compression)
    return path


def with_data_pkl(tmp_path: Path, body: bytes, name: str = "bad.pt") -> Path:
    """pt_clean.pt with its data.pkl replaced by ``body``."""
    data = assets.rezip((ASSETS / "pt_clean.pt").read_bytes(), {"pt_clean/data.pkl": body})
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- round trips


def test_clean_zip_asset_round_trip() -> None:
    graph = pytorch.load(ASSETS / "pt_clean.pt")
    assert graph.format == "pytorch"
    assert graph.metadata["container"] == "zip"
    assert graph.metadata["state_dict_key"] is None
    assert_same(graph, assets.tiny_model().state_dict())
    assert kinds(graph) == {
        "conv": LayerKind.CONV2D,
        "bn": LayerKind.BATCH_NORM,
        "dw": LayerKind.CONV2D,
        "fc": LayerKind.LINEAR,
    }
    assert graph.layer("dw").attrs["groups_inferred"] == 4
    assert graph.files == [ASSETS / "pt_clean.pt"]


def test_nested_asset_ignores_epoch_and_optimizer() -> None:
    graph = pytorch.load(ASSETS / "pt_nested.pt")
    assert graph.metadata["state_dict_key"] == "state_dict"
    assert_same(graph, assets.tiny_model().state_dict())


@pytest.mark.parametrize("key", ["state_dict", "model", "net", "model_state_dict", "module"])
def test_state_dict_nested_under_key(tmp_path: Path, key: str) -> None:
    model = rich_model()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 8, 8), torch.zeros(2, 1, dtype=torch.long)).sum().backward()
    optimizer.step()
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "best": 0.5, "name": "x", key: model.state_dict(), "optim": optimizer.state_dict()}, path)
    graph = pytorch.load(path)
    assert graph.metadata["state_dict_key"] == key
    assert_same(graph, model.state_dict())


def test_data_parallel_prefix_is_kept(tmp_path: Path) -> None:
    model = nn.DataParallel(assets.tiny_model())
    path = tmp_path / "dp.pt"
    torch.save({"model": model.state_dict()}, path)
    graph = pytorch.load(path)
    assert graph.layer("module.conv").kind is LayerKind.CONV2D
    assert_same(graph, model.state_dict())


def test_rich_state_dict_kinds(tmp_path: Path) -> None:
    model = rich_model()
    path = tmp_path / "rich.pt"
    torch.save(model.state_dict(), path)
    graph = pytorch.load(path)
    assert_same(graph, model.state_dict())
    assert kinds(graph) == RICH_KINDS
    assert graph.layer("grouped").attrs["groups_inferred"] == 2
    assert graph.layer("depthwise").attrs["groups_inferred"] == 8
    assert graph.layer("lstm").attrs["hidden_size"] == 5


def test_legacy_asset_round_trip() -> None:
    graph = pytorch.load(ASSETS / "pt_legacy.pt")
    assert graph.metadata["container"] == "legacy"
    assert_same(graph, assets.tiny_model().state_dict())


def test_legacy_rich_round_trip(tmp_path: Path) -> None:
    model = rich_model()
    path = tmp_path / "legacy.pt"
    torch.save({"net": model.state_dict(), "epoch": 1}, path, _use_new_zipfile_serialization=False)
    graph = pytorch.load(path)
    assert graph.metadata == {"container": "legacy", "state_dict_key": "net", "tensors": len(model.state_dict())}
    assert_same(graph, model.state_dict())
    assert kinds(graph) == RICH_KINDS


def test_scripted_asset_round_trip() -> None:
    graph = pytorch.load(ASSETS / "pt_scripted.pt")
    assert graph.metadata["container"] == "torchscript"
    assert graph.metadata["torchscript_class"] == "__torch__.TinyNet"
    assert_same(graph, assets.tiny_model().state_dict())
    assert all("kind_inferred" not in layer.attrs for layer in graph)  # kinds come from the class names


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_rich_round_trip(tmp_path: Path, how: str) -> None:
    model = rich_model()
    example = (torch.randn(1, 3, 8, 8), torch.zeros(1, 1, dtype=torch.long))
    module = torch.jit.script(model) if how == "script" else torch.jit.trace(model, example)
    path = tmp_path / f"{how}.pt"
    module.save(str(path))
    graph = pytorch.load(path)
    assert graph.metadata["container"] == "torchscript"
    assert_same(graph, model.state_dict())
    assert kinds(graph) == RICH_KINDS
    assert all("kind_inferred" not in layer.attrs for layer in graph)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("legacy", [False, True])
def test_half_precision(tmp_path: Path, dtype: torch.dtype, legacy: bool) -> None:
    model = assets.tiny_model().to(dtype)
    path = tmp_path / "half.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    graph = pytorch.load(path)
    assert_same(graph, model.state_dict())
    weight = graph.layer("conv").params["weight"]
    assert weight.dtype == ("float16" if dtype is torch.float16 else "bfloat16")
    as_float = weight.read(float32=True)
    assert as_float.dtype == torch.float32
    assert torch.equal(as_float, model.conv.weight.detach().float())


@pytest.mark.parametrize("legacy", [False, True])
def test_views_of_one_storage(tmp_path: Path, legacy: bool) -> None:
    base = torch.arange(24, dtype=torch.float32)
    saved = {
        "a": base,
        "b": base[2:],
        "c": base.view(4, 6)[:, 1:4],
        "d": base.view(4, 6).t(),
        "p": nn.Parameter(base[:3]),
    }
    path = tmp_path / "views.pt"
    torch.save(saved, path, _use_new_zipfile_serialization=not legacy)
    graph = pytorch.load(path)
    got = tensors(graph)
    assert list(got) == list(saved)
    for name, value in saved.items():
        assert torch.equal(got[name], value.detach()), name


def test_parameters_and_unread_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pt"
    complex_tensor = torch.zeros(2, dtype=torch.complex64)
    torch.save({"w": nn.Parameter(torch.ones(2, 2)), "c": complex_tensor, "i": torch.arange(3)}, path)
    graph = pytorch.load(path)
    assert [t.name for layer in graph for t in layer.params.values()] == ["w", "i"]
    assert graph.layer("i").params["i"].dtype == "int64"
    assert any("'c' is a ComplexFloatStorage" in note for note in graph.notes)


def test_load_model_detects_by_content(tmp_path: Path) -> None:
    for name in ("pt_clean.pt", "pt_legacy.pt", "pt_scripted.pt"):
        renamed = tmp_path / (name + ".weights")
        renamed.write_bytes((ASSETS / name).read_bytes())
        assert detect_format(renamed).id == "pytorch"
        assert_same(load_model(renamed), assets.tiny_model().state_dict())


# --------------------------------------------------------------------------- laziness


def test_load_reads_no_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[str] = []
    for fn in ("mmap_tensor", "_read_file_range", "_inflate", "_verify_crc"):
        original = getattr(pytorch, fn)

        def counting(*args, _fn=fn, _orig=original, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(_fn)
            return _orig(*args, **kwargs)

        monkeypatch.setattr(pytorch, fn, counting)
    graphs = [pytorch.load(ASSETS / name) for name in ("pt_clean.pt", "pt_legacy.pt", "pt_scripted.pt")]
    assert calls == []
    for graph in graphs:
        graph.layer("conv").params["weight"].read()
    assert calls == ["_verify_crc", "mmap_tensor", "_read_file_range", "_verify_crc", "mmap_tensor"]


def test_compressed_entries_are_read_on_demand(tmp_path: Path) -> None:
    with zipfile.ZipFile(ASSETS / "pt_clean.pt") as zf:
        entries = {info.filename: zf.read(info) for info in zf.infolist()}
    path = write_zip(tmp_path / "deflated.pt", entries, zipfile.ZIP_DEFLATED)
    graph = pytorch.load(path)
    assert_same(graph, assets.tiny_model().state_dict())


# --------------------------------------------------------------------------- refusing code


class Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_saved_reduce_payload_is_refused(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(
        {"state_dict": assets.tiny_model().state_dict(), "x": Evil(marker)},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(UnsafeInputError) as err:
        pytorch.load(path)
    assert f"{os.system.__module__}.system, which auditor will not rebuild" in str(err.value)
    assert not marker.exists()


def test_injected_os_system_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the asset's payload is "touch pt_pwned" in the working folder
    path = ASSETS / "pt_os_system.pt"
    with pytest.raises(UnsafeInputError) as err:
        load_model(path)
    assert str(err.value) == (
        f"{path}: refused: the pickle references os.system, which auditor will not rebuild "
        "(only tensors, storages and plain containers are read)"
    )
    assert not (tmp_path / "pt_pwned").exists()
    marker = tmp_path / "pwned2"
    with pytest.raises(UnsafeInputError):
        pytorch.load(with_data_pkl(tmp_path, assets.os_system_pickle(f"touch {marker}")))
    assert not marker.exists()


def test_namespace_is_refused_by_name() -> None:
    path = ASSETS / "pt_namespace.pt"
    with pytest.raises(UnsafeInputError) as err:
        pytorch.load(path)
    assert str(err.value) == (
        f"{path}: refused: the pickle references argparse.Namespace, which auditor will not rebuild "
        "(only tensors, storages and plain containers are read)"
    )


def test_whole_pickled_model_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(UnsafeInputError, match=r"torch\.nn\.modules\.linear\.Linear.*save its state_dict\(\)"):
        pytorch.load(path)


def test_cli_inspect_exits_5_with_one_line(run_cli: Callable[..., Any]) -> None:
    path = ASSETS / "pt_namespace.pt"
    proc = run_cli("inspect", str(path))
    assert proc.code == 5
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "argparse.Namespace" in lines[0]
    assert "Traceback" not in proc.stderr


def test_extension_opcodes_and_wild_memo_are_refused(tmp_path: Path) -> None:
    ext = with_data_pkl(tmp_path, b"\x80\x02\x82\xf0)R.", "ext.pt")
    with pytest.raises(UnsafeInputError, match=r"refused: data\.pkl uses the EXT1 opcode"):
        pytorch.load(ext)
    memo = with_data_pkl(tmp_path, b"\x80\x02Nr\xff\xff\xff\x7f.", "memo.pt")
    with pytest.raises(InputError, match=r"data\.pkl is malformed: memo index 2147483647 at opcode 3"):
        pytorch.load(memo)


def test_input_file_is_left_untouched() -> None:
    path = ASSETS / "pt_clean.pt"
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    graph = pytorch.load(path)
    for layer in graph:
        for ref in layer.params.values():
            ref.read().fill_(0)  # copy-on-write: scribbling on a read tensor never reaches the file
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == mtime
    assert_same(pytorch.load(path), assets.tiny_model().state_dict())


# --------------------------------------------------------------------------- broken and hostile files


def test_truncated_zip() -> None:
    path = ASSETS / "pt_truncated.pt"
    assert detect_format(path).id == "pytorch"  # still recognised, so the user hears what is wrong
    with pytest.raises(InputError) as err:
        load_model(path)
    assert str(err.value) == (
        f"{path}: the zip archive is damaged or truncated: it has no end-of-central-directory record"
    )


def test_truncated_legacy() -> None:
    path = ASSETS / "pt_truncated_legacy.pt"
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == f"{path}: truncated: storage '00000000000009' needs bytes 2303..2351, the file holds 2331"


def test_truncated_legacy_pickle(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    path.write_bytes((ASSETS / "pt_legacy.pt").read_bytes()[:300])
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == f"{path}: the main pickle is truncated: the file ends before its STOP opcode"


def test_absurd_storage_size() -> None:
    path = ASSETS / "pt_huge_storage.pt"
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == (
        f"{path}: tensor 'w': storage '0' declares 1000000000000000 float32 elements (4000000000000000 bytes) "
        "but entry 'pt_huge/data/0' holds 16 bytes"
    )


def test_view_beyond_its_storage(tmp_path: Path) -> None:
    body = assets.huge_storage_pickle(4).replace(b"K\x04\x85K\x01\x85", b"K\x04\x85K\x02\x85")
    path = rezip_to(tmp_path, assets.saved({"w": torch.zeros(4)}, "pt_huge"), {"pt_huge/data.pkl": body})
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == (
        f"{path}: tensor 'w': size (4,) with stride (2,) at offset 0 reaches element 7 of a storage of 4"
    )


def rezip_to(tmp_path: Path, data: bytes, replace: dict[str, bytes]) -> Path:
    path = tmp_path / "crafted.pt"
    path.write_bytes(assets.rezip(data, replace))
    return path


def test_tampered_weights_fail_their_crc() -> None:
    path = ASSETS / "pt_tampered.pt"
    graph = pytorch.load(path)  # the tables are intact; the damage shows when the weight is read
    with pytest.raises(InputError) as err:
        graph.layer("conv").params["weight"].read()
    assert str(err.value) == (
        f"{path}: entry 'pt_clean/data/0' was altered: its CRC-32 is c61a0aff, the archive records 29efe362"
    )
    assert torch.equal(graph.layer("fc").params["weight"].read(), assets.tiny_model().fc.weight.detach())


def test_zip_bomb(tmp_path: Path) -> None:
    bomb = b"\x80\x02B" + (32 << 20).to_bytes(4, "little") + bytes(32 << 20) + b"."
    path = write_zip(tmp_path / "bomb.pt", {"bomb/data.pkl": bomb}, zipfile.ZIP_DEFLATED)
    size = zipfile.ZipFile(path).getinfo("bomb/data.pkl").compress_size
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == (
        f"{path}: entry 'bomb/data.pkl' inflates {size} bytes to {len(bomb)} "
        f"(ratio {len(bomb) / size:.0f}:1): refused as a zip bomb"
    )


def test_pickle_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pytorch, "MAX_PICKLE", 100)
    path = ASSETS / "pt_clean.pt"
    size = zipfile.ZipFile(path).getinfo("pt_clean/data.pkl").file_size
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == f"{path}: entry 'pt_clean/data.pkl' declares {size} bytes, more than the 100-byte limit"


def test_deeply_nested_pickle(tmp_path: Path) -> None:
    deep = b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."
    path = write_zip(tmp_path / "deep.pt", {"deep/data.pkl": deep}, zipfile.ZIP_DEFLATED)
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == f"{path}: the pickle nests objects more than 1000 levels deep"


def test_billion_laughs_is_linear(tmp_path: Path) -> None:
    lol: list[object] = ["ha"]
    for _ in range(60):  # 10**60 leaves as a tree, 61 lists as a graph
        lol = [lol] * 10
    path = tmp_path / "laughs.pt"
    torch.save({"w": torch.ones(2), "laughs": lol}, path)
    start = time.process_time()
    graph = pytorch.load(path)
    assert [t.name for layer in graph for t in layer.params.values()] == ["w"]
    assert time.process_time() - start < 30  # generous: a tree walk would never finish


def test_entry_pointing_outside_the_archive(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "slip.pt", {"a/data.pkl": pickle.dumps({}, protocol=2), "a/../../etc/x": b"x"})
    with pytest.raises(UnsafeInputError) as err:
        pytorch.load(path)
    assert str(err.value) == (
        f"{path}: refused: the archive holds an entry named 'a/../../etc/x', which points outside it"
    )


def test_duplicate_entries(tmp_path: Path) -> None:
    entries = zipfile.ZipFile(ASSETS / "pt_clean.pt")
    path = tmp_path / "dup.pt"
    with zipfile.ZipFile(path, "w") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        for info in entries.infolist():
            zf.writestr(info.filename, entries.read(info))
        zf.writestr("pt_clean/data/0", b"\x00" * 16)
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == f"{path}: the archive holds 2 entries named 'pt_clean/data/0' (tampered?)"


def test_missing_storage_entry(tmp_path: Path) -> None:
    data = assets.rezip((ASSETS / "pt_clean.pt").read_bytes(), drop=("pt_clean/data/3",))
    path = tmp_path / "missing.pt"
    path.write_bytes(data)
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == f"{path}: tensor 'bn.bias': storage '3' has no entry 'pt_clean/data/3'"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x80\x02]q\x00.", "holds no state dict: its top-level object is a list"),
        (
            pickle.dumps({"epoch": 1}, protocol=2),
            "holds no state dict: no dict of tensors at the top level or under its keys ('epoch')",
        ),
        (
            b"\x80\x02}q\x00(X\x01\x00\x00\x00wq\x01(X\x07\x00\x00\x00storageq\x02tQu.",
            "data.pkl is malformed: a storage persistent id has 1 fields, not 5",
        ),
        (
            b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.",
            "refused: the pickle references builtins.eval, which auditor will not rebuild "
            "(only tensors, storages and plain containers are read)",
        ),
        (
            b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n.",
            "refused: the pickle references numpy.core.multiarray._reconstruct, which auditor will not rebuild "
            "(only tensors, storages and plain containers are read)",
        ),
        (b"\x80\x02}q\x00.junk", "data.pkl has 4 bytes after its STOP opcode"),
        (  # BUILD on one of auditor's constructors would set attributes that outlive the load
            b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x01\x00\x00\x00aK\x01sb.",
            "data.pkl is malformed: a _SafeCall cannot take state from the pickle",
        ),
    ],
)
def test_malformed_data_pkl(tmp_path: Path, body: bytes, message: str) -> None:
    path = with_data_pkl(tmp_path, body)
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == f"{path}: {message}"


def test_random_bytes_behind_magic(tmp_path: Path) -> None:
    rng = torch.Generator().manual_seed(0)
    for prefix in (b"PK\x03\x04", b"\x80\x02\x8a\x0a" + pytorch.LEGACY_MAGIC.to_bytes(10, "little") + b"."):
        path = tmp_path / "noise.pt"
        path.write_bytes(prefix + bytes(torch.randint(0, 256, (500,), generator=rng, dtype=torch.uint8).tolist()))
        with pytest.raises(InputError):
            pytorch.load(path)


# --------------------------------------------------------------------------- sniffing


def test_sniff(tmp_path: Path) -> None:
    def head(p: Path) -> bytes:
        return p.read_bytes()[:64]

    for name in ("pt_clean.pt", "pt_legacy.pt", "pt_scripted.pt", "pt_truncated.pt", "pt_nested.pt"):
        assert pytorch.sniff(ASSETS / name, head(ASSETS / name)), name
    other = write_zip(tmp_path / "other.zip", {"docs/readme.txt": b"hello"})
    assert not pytorch.sniff(other, head(other))
    noise = tmp_path / "noise"
    noise.write_bytes(b"PK\x03\x04" + b"\xff" * 40)
    assert not pytorch.sniff(noise, head(noise))
    assert not pytorch.sniff(tmp_path, b"")
    assert not pytorch.sniff(tmp_path / "absent", b"PK\x03\x04")
    assert not pytorch.sniff(noise, b"\x80\x02\x8a\x0a" + b"\x00" * 10)
    buf = io.BytesIO()
    torch.save({"a": torch.ones(1)}, buf, _use_new_zipfile_serialization=False, pickle_protocol=4)
    legacy4 = tmp_path / "legacy4.pt"
    legacy4.write_bytes(buf.getvalue())
    assert pytorch.sniff(legacy4, head(legacy4))
    assert torch.equal(tensors(pytorch.load(legacy4))["a"], torch.ones(1))


def test_opcode_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from auditor.formats import _unpickle

    monkeypatch.setattr(_unpickle, "MAX_OPCODES", 10)
    path = ASSETS / "pt_clean.pt"
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == f"{path}: data.pkl holds more than 10 opcodes"


def test_unknown_compression_method(tmp_path: Path) -> None:
    data = bytearray((ASSETS / "pt_clean.pt").read_bytes())
    name = b"pt_clean/data/0"
    central = data.index(b"PK\x01\x02")  # the central directory, where zipfile reads the method
    while not (
        int.from_bytes(data[central + 28 : central + 30], "little") == len(name)
        and data[central + 46 : central + 46 + len(name)] == name
    ):
        central = data.index(b"PK\x01\x02", central + 4)
    data[central + 10 : central + 12] = (99).to_bytes(2, "little")
    path = tmp_path / "method.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == f"{path}: entry 'pt_clean/data/0' uses compression method 99, which auditor does not read"


# --------------------------------------------------------------------------- lying archives (issue 14, case 2)


def test_lying_sizes_asset_is_refused_before_anything_is_inflated(run_cli: Callable[..., Any]) -> None:
    """The 200:1 ratio check passed this archive (its headers understate the compressed size 150 times);
    the old loader read it, and inflated the whole storage to read a 9-element tensor."""
    path = ASSETS / "pt_lying_sizes.pt"
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("lying/data/0")
    start = info.header_offset + 30 + len("lying/data/0")
    central = zipfile.ZipFile(path).start_dir
    with pytest.raises(InputError) as err:
        load_model(path)
    assert str(err.value) == (
        f"{path}: entry 'lying/data/0' (bytes {start}..{start + info.compress_size}) runs into the central "
        f"directory at byte {central}: the archive is truncated or its sizes lie"
    )
    code, _, stderr = run_cli("inspect", str(path))
    assert (code, stderr.count("\n")) == (4, 1)


def spy_inflate(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the buffers pytorch's loader inflates into, call by call."""
    from auditor.formats import _zip

    sizes: list[int] = []
    original = _zip.inflate_into

    def spy(path: Path, fh: Any, entry: Any, out: memoryview) -> None:
        sizes.append(len(out))
        original(path, fh, entry, out)

    monkeypatch.setattr(_zip, "inflate_into", spy)
    return sizes


def test_storage_is_inflated_only_as_far_as_the_tensor_reaches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    numel = 4 << 20  # 16 MiB of zeros, at the zip-bomb floor: an honest archive
    path = tmp_path / "big_storage.pt"
    path.write_bytes(assets.deflated_storage_zip(numel, 9))
    sizes = spy_inflate(monkeypatch)
    graph = pytorch.load(path)
    assert (
        f"entry 'lying/data/0' declares {4 * numel} bytes but its tensors reach only the first 36: "
        "the rest is never inflated, so its size and CRC-32 are not checked"
    ) in graph.notes
    assert torch.equal(tensors(graph)["w"], torch.zeros(9))
    assert sizes == [36]


def deflated(tmp_path: Path, numel: int, used: int, data_numel: int | None = None, **patch: int) -> Path:
    data = assets.deflated_storage_zip(numel, used, data_numel=data_numel)
    path = tmp_path / "patched.pt"
    path.write_bytes(assets.patch_entry(data, "lying/data/0", **patch) if patch else data)
    return path


def read_w(path: Path) -> torch.Tensor:
    return tensors(pytorch.load(path))["w"]


def test_a_whole_deflated_entry_is_verified(tmp_path: Path) -> None:
    assert torch.equal(read_w(deflated(tmp_path, 64, 64)), torch.zeros(64))
    crc = zipfile.ZipFile(deflated(tmp_path, 64, 64)).getinfo("lying/data/0").CRC
    path = deflated(tmp_path, 64, 64, crc=crc ^ 1)
    with pytest.raises(InputError) as err:
        read_w(path)
    assert str(err.value) == (
        f"{path}: entry 'lying/data/0' was altered: its CRC-32 is {crc:08x}, the archive records {crc ^ 1:08x}"
    )


def test_declared_sizes_that_do_not_match_what_inflates(tmp_path: Path) -> None:
    # The pickle and both headers say 300 bytes; the stream inflates to 256.
    path = deflated(tmp_path, 75, 75, data_numel=64, size=300)
    with pytest.raises(InputError) as err:
        read_w(path)
    assert str(err.value) == (
        f"{path}: entry 'lying/data/0' inflates to 256 bytes, fewer than the 300 its tensors need (it declares 300)"
    )
    # The pickle and both headers say 200 bytes, so the whole entry is read; the stream goes on.
    path = deflated(tmp_path, 50, 50, data_numel=64, size=200)
    with pytest.raises(InputError) as err:
        read_w(path)
    assert str(err.value) == f"{path}: entry 'lying/data/0' inflates to more than the 200 bytes it declares (tampered?)"


def test_compressed_size_shorter_than_the_stream(tmp_path: Path) -> None:
    size = zipfile.ZipFile(deflated(tmp_path, 64, 64)).getinfo("lying/data/0").compress_size
    path = deflated(tmp_path, 64, 64, compressed=size - 1)
    with pytest.raises(InputError) as err:
        read_w(path)
    assert str(err.value) == (
        f"{path}: truncated: entry 'lying/data/0''s deflate stream does not end within its {size - 1} bytes"
    )


def test_local_header_that_disagrees_with_the_central_directory(tmp_path: Path) -> None:
    clean = (ASSETS / "pt_clean.pt").read_bytes()
    info = zipfile.ZipFile(ASSETS / "pt_clean.pt").getinfo("pt_clean/data/1")
    path = tmp_path / "disagree.pt"
    path.write_bytes(assets.patch_entry(clean, "pt_clean/data/1", crc=info.CRC ^ 1, local=False))
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    n = info.file_size
    assert str(err.value) == (
        f"{path}: entry 'pt_clean/data/1': its local header at byte {info.header_offset} declares CRC "
        f"{info.CRC:08x}, {n} bytes compressed, {n} bytes; the central directory {info.CRC ^ 1:08x}, {n}, {n} "
        "(tampered?)"
    )


def test_entries_that_overlap(tmp_path: Path) -> None:
    data = assets.deflated_storage_zip(64, 64)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        storage, after = zf.getinfo("lying/data/0"), zf.getinfo("lying/version")
    path = tmp_path / "overlap.pt"
    path.write_bytes(assets.patch_entry(data, "lying/data/0", compressed=storage.compress_size + 40))
    end = storage.header_offset + 30 + len("lying/data/0") + storage.compress_size + 40
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == (
        f"{path}: entry 'lying/version' starts at byte {after.header_offset}, inside entry 'lying/data/0' "
        f"(which ends at {end}): entries overlap (tampered?)"
    )


def test_entry_name_that_is_not_utf8(tmp_path: Path) -> None:
    data = bytearray((ASSETS / "pt_clean.pt").read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 8 : central + 10] = (0x800).to_bytes(2, "little")  # "the name is UTF-8"
    data[central + 46 : central + 48] = b"\xff\xfe"  # it is not
    path = tmp_path / "name.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        load_model(path)
    assert not err.value.internal  # once a UnicodeDecodeError that only the catch-all turned into exit 4
    assert str(err.value) == (
        f"{path}: the central directory record at byte {central} names an entry b'\\xff\\xfe_clean/data.pkl' "
        "that is not valid UTF-8, though flagged so"
    )


def test_torch_layout_asset_round_trip() -> None:
    """torch.save's own layout: data descriptors after each entry, zip64 end records, aligned data."""
    graph = pytorch.load(ASSETS / "pt_torch_layout.pt")
    assert_same(graph, assets.tiny_model().state_dict())
    assert not any("entry" in note for note in graph.notes)


# --------------------------------------------------------------------------- bounded pickles (issue 14, case 3)


def test_opcode_heavy_pickle_is_refused_before_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """9.9 million small dicts, 19.8 million opcodes in 19.8 MB: the old loader unpickled them all (67 s, 2.0 GB)."""
    from auditor.formats import _unpickle

    def never(*args: Any) -> Any:
        raise AssertionError("the pickle was unpickled")

    monkeypatch.setattr(_unpickle.SafeUnpickler, "load", never)
    path = write_zip(tmp_path / "dicts.pt", {"dicts/data.pkl": assets.opcode_heavy_pickle()})
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == (
        f"{path}: data.pkl would take more than 384 MiB of memory to unpickle (refused, estimated)"
    )


def test_many_opcodes_of_nothing_are_refused(tmp_path: Path) -> None:
    path = with_data_pkl(tmp_path, b"\x80\x02" + b"N0" * 5_000_001 + b"N.")
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == f"{path}: data.pkl holds more than 10000000 opcodes"


def test_large_state_dict_is_within_the_budget(tmp_path: Path) -> None:
    path = tmp_path / "many.pt"
    torch.save({f"layers.{i}.weight": torch.full((2,), float(i)) for i in range(20_000)}, path)
    graph = pytorch.load(path)
    assert graph.metadata["tensors"] == 20_000
    assert torch.equal(graph.layer("layers.19999").params["weight"].read(), torch.full((2,), 19999.0))


def test_deeply_nested_tuple_is_refused_before_it_is_hashed(tmp_path: Path) -> None:
    """Hashing a tuple nested 100,000 deep (as a dict key) crashed the interpreter: no message, exit 139."""
    path = with_data_pkl(tmp_path, b"\x80\x02}" + b")" + b"\x85" * 100_000 + b"Ns.")
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == f"{path}: data.pkl nests tuples more than 1000 levels deep (at byte 1004)"


def test_what_constructors_build_is_charged_while_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from auditor.formats import _unpickle

    # set(list of 1000 ints): 3 KB of opcodes by the scan, a 32 KB set once built
    body = b"\x80\x02c__builtin__\nset\n](" + b"".join(b"M" + i.to_bytes(2, "little") for i in range(1000)) + b"e\x85R."
    path = with_data_pkl(tmp_path, body)
    scanned = _unpickle.scan(body, path=path, what="data.pkl").memory
    monkeypatch.setattr(_unpickle, "MAX_MEMORY", scanned + 1000)
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == f"{path}: data.pkl would take more than 0 MiB of memory to unpickle (refused, estimated)"


def test_a_view_repeating_its_storage_is_refused(tmp_path: Path) -> None:
    """Size (2**20, 2**20) with strides (0, 0) reads as one element; float32=True would make it 4 TiB."""
    body = assets.huge_storage_pickle(4).replace(
        b"K\x04\x85K\x01\x85", b"J\x00\x00\x10\x00J\x00\x00\x10\x00\x86K\x00K\x00\x86"
    )
    path = rezip_to(tmp_path, assets.saved({"w": torch.zeros(4)}, "pt_huge"), {"pt_huge/data.pkl": body})
    with pytest.raises(InputError) as err:
        pytorch.load(path)
    assert str(err.value) == (
        f"{path}: tensor 'w': size (1048576, 1048576) with stride (0, 0) repeats 1 stored elements as "
        f"{2**40}: refused (reading it would take {2**42} bytes)"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (  # once a UnicodeEncodeError inside auditor's own constructor
            b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00\xc4\x80X\x06\x00\x00\x00latin1\x86R.",
            "data.pkl is malformed: _codecs.encode is given text that is not latin1",
        ),
        (  # once a ValueError formatting the key for the message (more than 4,300 digits)
            b"\x80\x02}\x8b\x10\x27\x00\x00" + b"\x01" * 10_000 + b"Ns.",
            "holds no state dict: no dict of tensors at the top level or under its keys (<an integer of 79993 bits>)",
        ),
        (  # once a TypeError: auditor's constructors count their arguments
            b"\x80\x02ctorch._utils\n_rebuild_tensor\n(K\x01K\x02K\x03K\x04K\x05tR.",
            "data.pkl is malformed: torch._utils._rebuild_tensor is called with 5 arguments",
        ),
        (
            b"\x80\x02ccollections\nOrderedDict\n]K\x01a\x85R.",
            "data.pkl is malformed: an OrderedDict is built from 1, not a key-value pair",
        ),
        (b"\x80\x02T\xff\xff\xff\xff.", "data.pkl is malformed: BINSTRING at byte 2 has a negative length"),
        (b"\x80\x02\xff.", "data.pkl is malformed: unknown opcode 0xff at byte 2"),
        (b"\x80\x02}X\x01\x00\x00", "data.pkl is truncated: it ends before its STOP opcode"),
    ],
)
def test_malformed_pickles_name_what_is_wrong(tmp_path: Path, body: bytes, message: str) -> None:
    path = with_data_pkl(tmp_path, body)
    with pytest.raises(InputError) as err:
        load_model(path)
    assert not err.value.internal
    assert str(err.value) == f"{path}: {message}"


class _Unseekable(io.RawIOBase):
    """A write-only stream without seek: zipfile then writes a data descriptor after each entry."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += b
        return len(b)


@pytest.mark.parametrize("seekable", [True, False])
def test_zip64_records_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seekable: bool) -> None:
    """Checkpoints over 4 GiB keep sizes and offsets in zip64 extra fields, end records and data descriptors;
    zipfile writes them for a 10-byte limit just as for a 4 GiB one."""
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 10)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)
    out: Any = io.BytesIO() if seekable else _Unseekable()
    with zipfile.ZipFile(ASSETS / "pt_clean.pt") as src, zipfile.ZipFile(out, "w") as zf:
        for info in src.infolist():
            with zf.open(zipfile.ZipInfo(info.filename, (2020, 1, 1, 0, 0, 0)), "w", force_zip64=True) as fh:
                fh.write(src.read(info))
    data = out.getvalue() if seekable else bytes(out.data)
    assert b"PK\x06\x06" in data and (b"PK\x07\x08" in data) != seekable
    path = tmp_path / "zip64.pt"
    path.write_bytes(data)
    assert_same(pytorch.load(path), assets.tiny_model().state_dict())
