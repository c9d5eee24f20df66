"""Fuzzing the safetensors loader: whatever the bytes, the only way out is an InputError that a check
raised on purpose, never the load stage's catch-all (:class:`~auditor.errors.LoaderBugError`).

Five sources of hostile files: random bytes; a valid length prefix with a random JSON-ish header
(arbitrary JSON values, and tensor tables with random dtypes, shapes and offsets) and random data;
byte mutations of a valid tiny file (hypothesis); seeded byte mutations of every safetensors asset
in tests/assets; and seeded sharded folders whose index maps tensors to shards that may be missing,
outside the folder, oddly named or not safetensors at all. Each is loaded with the format's ``load``
and with ``load_model``; when it loads, every tensor is read, which must work or raise a deliberate
InputError. The seeded loops run in chunks: the first of each in the fast run, all of them (over
5,000 inputs with the hypothesis tests) in ``make test``.
"""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from auditor.audit.load import load_model
from auditor.errors import InputError
from auditor.formats import safetensors as st_format

FUZZ = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
    database=None,
)

CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "U16", "C64", "f32", ""]
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
NAMES = [
    "conv.weight",
    "conv.bias",
    "bn.weight",
    "bn.bias",
    "bn.running_mean",
    "bn.running_var",
    "fc.weight",
    "fc.bias",
    "emb.weight",
    "ln.weight",
    "rnn.weight_ih_l0",
    "rnn.weight_hh_l0",
    "rnn.bias_ih_l0",
    "rnn.weight_ih_l0_reverse",
    "0.weight",
    "10.weight",
    "2.weight",
    "__metadata__",
    "weight",
    "",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=16,
)
names = st.sampled_from(NAMES) | st.text(max_size=12)
# Bytes that keep a mutated header JSON-like half of the time, so mutants get past the parser.
byte_values = st.sampled_from(list(b'0123456789[]{}",:- eE')) | st.integers(0, 127) | st.integers(0, 255)
shapes = st.lists(st.integers(0, 6), max_size=4)


@st.composite
def tensor_tables(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """A header of tensors laid end to end (mostly consistent, sometimes not) and data of about the right size."""
    header: dict[str, Any] = {}
    offset = 0
    for name in draw(st.lists(names, max_size=6, unique=True)):
        code: Any = draw(st.sampled_from(CODES))
        shape: Any = draw(shapes)
        nbytes = math.prod(shape) * ITEMSIZE.get(code, 1)
        offsets: Any = [offset, offset + nbytes]
        if draw(st.integers(0, 9)) == 0:  # now and then, a field that is wrong in any way JSON allows
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            huge = st.sampled_from([10**4299, -(10**4299), 2**64])  # 4,300 digits: as many as JSON may hold
            bad = draw(json_values | st.lists(st.integers(-(2**65), 2**65) | huge, max_size=3))
            code, shape, offsets = (
                bad if field == "dtype" else code,
                bad if field == "shape" else shape,
                bad if field == "data_offsets" else offsets,
            )
        header[name] = {"dtype": code, "shape": shape, "data_offsets": offsets}
        offset += nbytes
    if draw(st.booleans()):
        metadata = st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)
        header["__metadata__"] = draw(json_values if draw(st.integers(0, 3)) == 0 else metadata)
    size = offset if draw(st.integers(0, 3)) else draw(st.integers(max(0, offset - 4), offset + 8))
    data = draw(st.binary(min_size=size, max_size=size))
    return header, data


def prefixed(raw: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(raw)) + raw + data


def tiny_file() -> bytes:
    generator = torch.Generator().manual_seed(0)
    return save(
        {
            "conv.weight": torch.randn(4, 2, 3, 3, generator=generator),
            "conv.bias": torch.randn(4, generator=generator).half(),
            "fc.weight": torch.randn(3, 4, generator=generator).bfloat16(),
            "fc.bias": torch.arange(3, dtype=torch.int64),
        },
        metadata={"format": "pt"},
    )


TINY = tiny_file()


def check(path: Path, label: str = "") -> bool:
    """Load with both entry points; only a deliberate InputError may escape, and every tensor reads or
    raises one. Whether the file loaded."""
    loaded = False
    for loader in (st_format.load, load_model):
        try:
            graph = loader(path)
        except InputError as exc:
            assert not exc.internal, f"{label} reached the loader's catch-all: {exc}"
            continue
        loaded = True
        json.dumps(graph.describe())
        for layer in graph:
            for ref in layer.params.values():
                try:
                    tensor = ref.read()
                    assert tuple(tensor.shape) == ref.shape
                    ref.read(float32=True)
                except InputError as exc:
                    assert not exc.internal, f"{label} reached a catch-all reading {ref.name!r}: {exc}"
    return loaded


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    check(path)


@FUZZ
@given(header=json_values, data=st.binary(max_size=64))
def test_random_json_header(tmp_path: Path, header: Any, data: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(prefixed(json.dumps(header).encode(), data))
    check(path)


@FUZZ
@given(table=tensor_tables())
def test_random_tensor_table(tmp_path: Path, table: tuple[dict[str, Any], bytes]) -> None:
    header, data = table
    path = tmp_path / "x.safetensors"
    path.write_bytes(prefixed(json.dumps(header).encode(), data))
    check(path)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, len(TINY) - 1), byte_values), min_size=1, max_size=8),
    cut=st.none() | st.integers(0, len(TINY)),
    insert=st.none() | st.tuples(st.integers(0, len(TINY)), st.binary(min_size=1, max_size=16)),
)
def test_mutated_valid_file(
    tmp_path: Path, edits: list[tuple[int, int]], cut: int | None, insert: tuple[int, bytes] | None
) -> None:
    data = bytearray(TINY)
    for position, value in edits:
        data[position] = value
    if insert is not None:
        data[insert[0] : insert[0]] = insert[1]
    if cut is not None:
        del data[cut:]
    path = tmp_path / "x.safetensors"
    path.write_bytes(bytes(data))
    check(path)


def test_the_unmutated_file_loads_and_reads() -> None:
    # the mutation test starts from a file that is valid, so its mutants probe the checks past the header
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.safetensors"
        path.write_bytes(TINY)
        graph = st_format.load(path)
        values = {ref.name: ref.read() for layer in graph for ref in layer.params.values()}
        assert set(values) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
        assert values["fc.bias"].tolist() == [0, 1, 2]
        assert np.isfinite(values["conv.weight"].numpy()).all()


# ---------------------------------------------------------------- seeded loops

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CORPUS = [TINY] + [p.read_bytes() for p in sorted(ASSETS.glob("st_*.safetensors")) if p.stat().st_size]
#: Seeded chunks of the corpus mutations and sharded folders; chunk 0 runs in the fast run.
CHUNKS, MUTANTS_PER_CHUNK, FOLDERS_PER_CHUNK = 10, 400, 100
CHUNK_PARAMS = [pytest.param(c, marks=() if c == 0 else pytest.mark.slow) for c in range(CHUNKS)]


def mutate(rng: random.Random, original: bytes) -> bytes:
    """One to six edits: bit flips, JSON-ish bytes, inserts, deletes, cut runs, spliced random bytes; now
    and then a new header length."""
    data = bytearray(original)
    for _ in range(rng.randint(1, 6)):
        if not data:
            break
        where, kind = rng.randrange(len(data)), rng.randrange(7)
        if kind == 0:
            data[where] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data[where] = rng.choice(b'0123456789[]{}",:-eE ')
        elif kind == 2:
            data.insert(where, rng.randrange(256))
        elif kind == 3:
            del data[where]
        elif kind == 4:
            del data[where : where + rng.randint(1, 16)]
        elif kind == 5:
            data[where:where] = rng.randbytes(rng.randint(1, 8))
        elif len(data) >= 8:
            (n,) = struct.unpack("<Q", data[:8])
            data[:8] = struct.pack("<Q", max(0, n + rng.randint(-3, 3)))
    return bytes(data)


@pytest.mark.parametrize("chunk", CHUNK_PARAMS)
def test_mutated_assets(tmp_path: Path, chunk: int) -> None:
    rng = random.Random(3000 + chunk)
    path = tmp_path / "x.safetensors"
    for i in range(MUTANTS_PER_CHUNK):
        path.write_bytes(mutate(rng, rng.choice(CORPUS)))
        check(path, f"mutant {i} of chunk {chunk}")


_SHARD_NAMES = ["model-1.safetensors", "model-2.safetensors", "missing.safetensors", "../model-1.safetensors",
                "/etc/passwd", "", ".", "sub", "sub/../model-1.safetensors", "a\x00b", "\ud800.safetensors",
                "\udcff", "x" * 300, "model.safetensors.index.json", "link.safetensors"]  # fmt: skip


def sharded_folder(rng: random.Random, folder: Path) -> None:
    """A folder of shards (valid, mutated or not safetensors) and an index that maps tensors to them."""
    folder.mkdir()
    (folder / "sub").mkdir()
    (folder / "link.safetensors").symlink_to(ASSETS / "st_cnn.safetensors")
    tensors = {f"layer{i}.{role}": torch.randn(2, 3) for i in range(3) for role in ("weight", "bias")}
    names = list(tensors)
    weight_map: dict[str, Any] = {}
    for shard in ("model-1.safetensors", "model-2.safetensors"):
        held = rng.sample(names, rng.randint(0, 4))
        data = save({n: tensors[n] for n in held})
        if rng.random() < 0.15:
            data = mutate(rng, data)
        if rng.random() < 0.95:
            (folder / shard).write_bytes(data)
        weight_map.update({n: shard for n in held if rng.random() < 0.95})
    for name in rng.sample(names, rng.randint(1, 2) if rng.random() < 0.4 else 0):
        weight_map[name] = rng.choice(_SHARD_NAMES)
    index: Any = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    if rng.random() < 0.1:
        index = rng.choice([[], {"weight_map": []}, {"weight_map": {"a": 1}}, {}, "x", None])
    text = json.dumps(index)
    if rng.random() < 0.1:
        text = mutate(rng, text.encode()).decode("utf-8", "replace")
    name = "model.safetensors.index.json" if rng.random() < 0.9 else "other.safetensors.index.json"
    (folder / name).write_text(text, encoding="utf-8", errors="surrogatepass")


@pytest.mark.parametrize("chunk", CHUNK_PARAMS)
def test_sharded_folders(tmp_path: Path, chunk: int) -> None:
    rng = random.Random(4000 + chunk)
    loaded = 0
    for i in range(FOLDERS_PER_CHUNK):
        folder = tmp_path / f"m{i}"
        sharded_folder(rng, folder)
        loaded += check(folder, f"sharded folder {i} of chunk {chunk}")
    assert loaded > FOLDERS_PER_CHUNK // 5, loaded  # the generator must keep reaching the loads, not only refusals


# ---------------------------------------------------------------- the loader bugs the fuzzers found


def test_offsets_of_thousands_of_digits_are_shown_cut(tmp_path: Path) -> None:
    # the message held all 4,300 digits
    path = tmp_path / "x.safetensors"
    path.write_bytes(
        prefixed(json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 10**4299]}}).encode())
    )
    with pytest.raises(InputError) as caught:
        st_format.load(path)
    assert caught.value.problem == (
        "truncated: tensor 'a' ends at data offset 100000000000000000...0000000000000000000,"
        " the file holds 0 data bytes"
    )


@pytest.mark.parametrize(
    ("shard", "problem"),
    [
        ("\ud800.safetensors", "shard has a file name that is not valid text ('\\ud800.safetensors')"),
        ("x" * 300, f"shard {'x' * 300!r} cannot be looked up: File name too long"),
    ],
)
def test_shard_names_no_file_system_holds_are_named(tmp_path: Path, shard: str, problem: str) -> None:
    # a UnicodeEncodeError and an OSError (ENAMETOOLONG) from the file system before
    (tmp_path / "model-1.safetensors").write_bytes(TINY)
    index = {"weight_map": {"conv.weight": "model-1.safetensors", "fc.bias": shard}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(InputError) as caught:
        st_format.load(tmp_path)
    assert caught.value.problem == problem
    assert caught.value.path == str(tmp_path / "model.safetensors.index.json")
