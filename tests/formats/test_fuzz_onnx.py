"""Fuzzing the ONNX loader: random bytes and mutations of a valid tiny model never raise
anything but InputError, and a model that loads can have every tensor read (or an InputError)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditor.audit.load import load_model
from auditor.errors import InputError
from auditor.formats import onnx as onnx_format

TINY = (Path(__file__).resolve().parents[1] / "assets" / "onnx_tiny.onnx").read_bytes()
FUZZ = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


@pytest.fixture
def target(tmp_path: Path) -> Path:
    return tmp_path / "fuzz.onnx"


def _check(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    for load in (onnx_format.load, load_model):
        try:
            graph = load(path)
        except InputError:
            continue
        for layer in graph.layers:
            for ref in layer.params.values():
                try:
                    ref.read()
                    ref.read(float32=True)
                except InputError:
                    pass


@FUZZ
@given(data=st.binary(max_size=512), lead=st.booleans())
def test_random_bytes(target: Path, data: bytes, lead: bool) -> None:
    _check(target, (b"\x08" if lead else b"") + data)


_MUTATION = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "truncate", "set"]), st.integers(0, len(TINY) - 1), st.integers(0, 255)
)


@FUZZ
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_tiny_model(target: Path, mutations: list[tuple[str, int, int]]) -> None:
    data = bytearray(TINY)
    for kind, position, value in mutations:
        if not data:
            break
        where = position % len(data)
        if kind == "flip":
            data[where] ^= 1 << (value % 8)
        elif kind == "set":
            data[where] = value
        elif kind == "insert":
            data.insert(where, value)
        elif kind == "delete":
            del data[where]
        elif kind == "truncate":
            del data[where:]
    _check(target, bytes(data))
