"""Fuzzing the safetensors loader: whatever the bytes, the only error is InputError.

Three sources of hostile files: random bytes; a valid length prefix with a
random JSON-ish header (arbitrary JSON values, and tensor tables with random
dtypes, shapes and offsets) and random data; byte mutations of a valid tiny
file. Each is loaded with the format's ``load`` and with ``load_model``; when a
file loads, every tensor is read, which must work or raise InputError.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
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
        code = draw(st.sampled_from(CODES))
        shape: Any = draw(shapes)
        nbytes = math.prod(shape) * ITEMSIZE.get(code, 1)
        offsets: Any = [offset, offset + nbytes]
        if draw(st.integers(0, 9)) == 0:  # now and then, a field that is wrong in any way JSON allows
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            bad = draw(json_values | st.lists(st.integers(-(2**65), 2**65), max_size=3))
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


def check(path: Path) -> None:
    """Load with both entry points; only InputError may escape, and every tensor reads or raises InputError."""
    for loader in (st_format.load, load_model):
        try:
            graph = loader(path)
        except InputError:
            continue
        json.dumps(graph.describe())
        for layer in graph:
            for ref in layer.params.values():
                try:
                    tensor = ref.read()
                    assert tuple(tensor.shape) == ref.shape
                    ref.read(float32=True)
                except InputError:
                    pass


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
