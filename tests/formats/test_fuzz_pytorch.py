"""Fuzzing the PyTorch loader: whatever the bytes, the only way out is an InputError raised on purpose,
never the catch-all's :class:`~auditor.errors.LoaderBugError`.

Sources of hostile files: random bytes behind the formats' magic numbers and byte mutations of the
clean checkpoints (hypothesis); and seeded mutants of every kind of real checkpoint in tests/assets
(zip as Python's zipfile writes it and as torch.save lays it out, deflated, zip64, nested, TorchScript,
legacy), made four ways: byte edits anywhere; edits of the zip's own records (central directory, local
headers, data descriptors, end records) set to boundary values; opcode-aware edits of the pickle, rezipped
with a correct CRC so that they reach the unpickler; and edits of the numbers a tensor is rebuilt from.
Each file is loaded with the format's ``load`` and with ``load_model``; when it loads, every tensor is
read, which must work or raise a deliberate InputError. The seeded loops run in chunks: the first of
each in the fast run, all of them (over 6,000 files with the hypothesis tests) in ``make test``.
"""

from __future__ import annotations

import importlib.util
import io
import pickletools
import random
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditor.audit.load import load_model
from auditor.errors import InputError
from auditor.formats import pytorch
from auditor.graph import LayerGraph

ASSETS = Path(__file__).resolve().parents[1] / "assets"
_spec = importlib.util.spec_from_file_location("make_pt_assets", ASSETS / "make_pt_assets.py")
assert _spec is not None and _spec.loader is not None
assets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(assets)

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
    database=None,
)
#: Seeded chunks of each mutation loop; chunk 0 runs in the fast run, the rest in ``make test``.
CHUNKS, PER_CHUNK = 4, 400
CHUNK_PARAMS = [pytest.param(c, marks=() if c == 0 else pytest.mark.slow) for c in range(CHUNKS)]


def _deflated(data: bytes) -> bytes:
    """A zip checkpoint rewritten with every entry deflated."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(zipfile.ZipInfo(info.filename, (2020, 1, 1, 0, 0, 0)), src.read(info), zipfile.ZIP_DEFLATED)
    return out.getvalue()


class _Unseekable(io.RawIOBase):
    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += b
        return len(b)


def _zip64(data: bytes, *, seekable: bool) -> bytes:
    """A zip checkpoint rewritten with zip64 records throughout (extra fields, end records, and data
    descriptors with 8-byte sizes when written to an unseekable stream)."""
    out: Any = io.BytesIO() if seekable else _Unseekable()
    with mock.patch.object(zipfile, "ZIP64_LIMIT", 10), mock.patch.object(zipfile, "ZIP_FILECOUNT_LIMIT", 2):
        with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                with dst.open(zipfile.ZipInfo(info.filename, (2020, 1, 1, 0, 0, 0)), "w", force_zip64=True) as fh:
                    fh.write(src.read(info))
    return out.getvalue() if seekable else bytes(out.data)


ZIPS = [
    (ASSETS / name).read_bytes() for name in ("pt_clean.pt", "pt_nested.pt", "pt_scripted.pt", "pt_torch_layout.pt")
]
ZIPS += [
    _deflated(CLEAN_ZIP),
    assets.deflated_storage_zip(64, 9),
    _zip64(CLEAN_ZIP, seekable=True),
    _zip64(CLEAN_ZIP, seekable=False),
]
LEGACY = [CLEAN_LEGACY]
CORPUS = ZIPS + LEGACY


def check(path: Path, data: bytes, label: str = "") -> int:
    """Load ``data`` both ways and read every tensor; fail on anything but a deliberate InputError.

    Returns how many of the two loads succeeded.
    """
    path.write_bytes(data)
    loaded = 0
    loader: Callable[[Path], LayerGraph]
    for loader in (pytorch.load, load_model):
        try:
            graph = loader(path)
        except InputError as exc:
            assert not exc.internal, f"{label} reached the loader's catch-all: {exc}"
            continue
        loaded += 1
        for layer in graph:
            for ref in layer.params.values():
                try:
                    ref.read(float32=True)
                except InputError as exc:
                    assert not exc.internal, f"{label} reached a catch-all reading {ref.name!r}: {exc}"
    return loaded


@pytest.fixture
def target(tmp_path: Path) -> Path:
    return tmp_path / "fuzz.pt"


@FUZZ
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=512))
def test_random_bytes(target: Path, prefix: bytes, body: bytes) -> None:
    check(target, prefix + body)


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
def test_mutated_checkpoints(target: Path, data: bytes) -> None:
    check(target, data)


# --------------------------------------------------------------------------- seeded mutants

INTERESTING = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


# Where each zip record keeps its fields: signature -> [(offset, width)].
_RECORDS = {
    b"PK\x01\x02": [(8, 2), (10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (42, 4)],
    b"PK\x03\x04": [(6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
    b"PK\x05\x06": [(8, 2), (10, 2), (12, 4), (16, 4), (20, 2)],
    b"PK\x06\x06": [(24, 8), (32, 8), (40, 8), (48, 8)],
    b"PK\x06\x07": [(8, 8)],
    b"PK\x07\x08": [(4, 4), (8, 4), (12, 4)],
}


def record_edits(rng: random.Random, original: bytes) -> bytes:
    """One to three fields of the zip's own records set to a boundary value, a neighbour or a random value."""
    data = bytearray(original)
    spots = [
        (at + offset, width)
        for signature, fields in _RECORDS.items()
        for at in _find_all(original, signature)
        for offset, width in fields
        if at + offset + width <= len(original)
    ]
    for _ in range(rng.randint(1, 3)):
        at, width = rng.choice(spots)
        old = int.from_bytes(data[at : at + width], "little")
        value = rng.choice([rng.choice(INTERESTING), old + rng.randint(-64, 64), rng.getrandbits(8 * width)])
        data[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(data)


def _find_all(data: bytes, needle: bytes) -> list[int]:
    found, at = [], data.find(needle)
    while at >= 0:
        found.append(at)
        at = data.find(needle, at + 1)
    return found


_OPCODES = [op.code.encode("latin1") for op in pickletools.opcodes]


def pickle_edits(rng: random.Random, pickle: bytes) -> bytes:
    """One to four opcode-aware edits: an opcode replaced, dropped, duplicated or inserted (with a few
    argument bytes), or the pickle cut at an opcode boundary."""
    ops = [pos for _, _, pos in pickletools.genops(pickle) if pos is not None]
    data = bytearray(pickle)
    for _ in range(rng.randint(1, 4)):
        at = rng.choice(ops)
        if at >= len(data):
            continue
        kind = rng.randrange(5)
        if kind == 0:
            data[at : at + 1] = rng.choice(_OPCODES)
        elif kind == 1:
            del data[at]
        elif kind == 2:
            data[at:at] = data[at : at + rng.randint(1, 12)]
        elif kind == 3:
            data[at:at] = rng.choice(_OPCODES) + rng.randbytes(rng.choice([0, 1, 2, 4, 8]))
        else:
            del data[at:]
    return bytes(data)


def number_edits(rng: random.Random, pickle: bytes) -> bytes:
    """One to three integer arguments (sizes, strides, offsets, storage sizes, memo indices) set to
    boundary values, or re-encoded as a LONG1 of up to 9 bytes."""
    data = bytearray(pickle)
    numbers = [
        (pos, op.name)
        for op, _, pos in pickletools.genops(pickle)
        if op.name in ("BININT1", "BININT", "LONG1") and pos is not None
    ]
    for _ in range(rng.randint(1, 3)):
        if not numbers:
            break
        pos, name = rng.choice(numbers)
        value = rng.choice([0, 1, 2, 3, 255, 256, 2**31 - 1, 2**32, 2**62, 2**63, 2**64, -1, -(2**63)])
        encoded = b"\x8a" + bytes([9]) + value.to_bytes(9, "little", signed=True)
        width = {"BININT1": 2, "BININT": 5}.get(name, 2 + data[pos + 1])
        data[pos : pos + width] = encoded
        numbers = [(p, n) for p, n in numbers if p < pos]  # positions after the edit have moved
    return bytes(data)


def _data_pkl(zipped: bytes) -> tuple[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        return name, zf.read(name)


def _rezipped(original: bytes, pickle: bytes) -> bytes:
    name, _ = _data_pkl(original)
    return assets.rezip(original, {name: pickle})


def _legacy_main(data: bytes) -> tuple[int, int]:
    """Where the legacy file's fourth pickle (the main object) starts and ends."""
    stream = io.BytesIO(data)
    for _ in range(3):
        for _op in pickletools.genops(stream):
            pass
    start = stream.tell()
    for _op in pickletools.genops(stream):
        pass
    return start, stream.tell()


def pickle_mutant(rng: random.Random, edit: Callable[[random.Random, bytes], bytes]) -> bytes:
    """A checkpoint whose main pickle went through ``edit``: rezipped (correct CRC) or spliced into a legacy file."""
    original = rng.choice(ZIPS[:4] + LEGACY)
    if original in LEGACY:
        start, end = _legacy_main(original)
        return original[:start] + edit(rng, original[start:end]) + original[end:]
    _, pickle = _data_pkl(original)
    return _rezipped(original, edit(rng, pickle))


@pytest.mark.parametrize("chunk", CHUNK_PARAMS)
def test_byte_edits_of_every_kind_of_checkpoint(
    target: Path, chunk: int, byte_edits: Callable[[random.Random, bytes], bytes]
) -> None:
    rng = random.Random(2000 + chunk)
    for i in range(PER_CHUNK):
        check(target, byte_edits(rng, rng.choice(CORPUS)), f"byte mutant {i} of chunk {chunk}")


@pytest.mark.parametrize("chunk", CHUNK_PARAMS)
def test_edits_of_the_zip_records(target: Path, chunk: int) -> None:
    rng = random.Random(3000 + chunk)
    loaded = sum(
        check(target, record_edits(rng, rng.choice(ZIPS)), f"record mutant {i} of chunk {chunk}")
        for i in range(PER_CHUNK)
    )
    assert loaded > 0  # some edits (dates, unused fields) leave the archive readable: the loop reaches tensors


@pytest.mark.parametrize("chunk", CHUNK_PARAMS)
def test_opcode_edits_of_the_pickle(target: Path, chunk: int) -> None:
    rng = random.Random(4000 + chunk)
    loaded = sum(
        check(target, pickle_mutant(rng, pickle_edits), f"pickle mutant {i} of chunk {chunk}") for i in range(PER_CHUNK)
    )
    assert loaded > 0


@pytest.mark.parametrize("chunk", CHUNK_PARAMS)
def test_edits_of_the_numbers_a_tensor_is_rebuilt_from(target: Path, chunk: int) -> None:
    rng = random.Random(5000 + chunk)
    loaded = sum(
        check(target, pickle_mutant(rng, number_edits), f"number mutant {i} of chunk {chunk}") for i in range(PER_CHUNK)
    )
    assert loaded > 0


def test_the_corpus_loads(target: Path) -> None:
    """Every unmutated file of the corpus loads both ways and reads: the mutants start from working checkpoints."""
    for i, data in enumerate(CORPUS):
        assert check(target, data, f"corpus file {i}") == 2, i
