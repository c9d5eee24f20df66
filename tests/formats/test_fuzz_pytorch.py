"""Fuzzing the PyTorch loader: whatever the bytes, the only way out is an InputError.

Each input is written to a file and loaded both with the format's own
``load`` and through ``load_model`` (sniffing included); a load that
succeeds must then read every tensor or fail with an InputError.
"""

from __future__ import annotations

from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from auditor.audit.load import load_model
from auditor.errors import InputError
from auditor.formats import pytorch

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLEAN_ZIP = (ASSETS / "pt_clean.pt").read_bytes()
CLEAN_LEGACY = (ASSETS / "pt_legacy.pt").read_bytes()
PREFIXES = [
    b"",
    b"PK\x03\x04",
    CLEAN_ZIP[:64],
    b"\x80\x02\x8a\x0a" + pytorch.LEGACY_MAGIC.to_bytes(10, "little") + b".",
    CLEAN_LEGACY[:200],
]
FUZZ = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


def check(path: Path, data: bytes) -> None:
    """Load ``data`` both ways; every failure must be an InputError (UnsafeInputError included)."""
    path.write_bytes(data)
    for loader in (pytorch.load, load_model):
        try:
            graph = loader(path)
        except InputError:
            continue
        for layer in graph:
            for ref in layer.params.values():
                try:
                    ref.read(float32=True)
                except InputError:
                    pass


@FUZZ
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=512))
def test_random_bytes(tmp_path: Path, prefix: bytes, body: bytes) -> None:
    check(tmp_path / "fuzz.pt", prefix + body)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A clean checkpoint with a few bytes flipped, inserted or deleted, or truncated."""
    data = bytearray(draw(st.sampled_from([CLEAN_ZIP, CLEAN_LEGACY])))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "overwrite"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
    return bytes(data)


@FUZZ
@given(data=mutated())
def test_mutated_checkpoints(tmp_path: Path, data: bytes) -> None:
    check(tmp_path / "fuzz.pt", data)
