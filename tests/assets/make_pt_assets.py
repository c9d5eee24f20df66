"""Regenerate the tiny PyTorch assets ``tests/assets/pt_*`` (seeded, byte-for-byte reproducible).

Run ``python tests/assets/make_pt_assets.py`` (it re-runs itself with
``PYTHONHASHSEED=0``, on which TorchScript's code files depend). torch.save writes a random
``.data/serialization_id`` into zip archives and memory addresses as legacy
storage keys; both are normalised here so that a rerun gives the same bytes.

* ``pt_clean.pt``            state dict of :class:`TinyNet` (torch.save zip)
* ``pt_nested.pt``           ``{"state_dict": ..., "epoch": 7, "arch": ..., "optimizer": ...}``
* ``pt_legacy.pt``           the state dict in the pre-1.6 legacy format
* ``pt_scripted.pt``         ``torch.jit.script(TinyNet())``
* ``pt_truncated.pt``        ``pt_clean.pt`` cut in half
* ``pt_truncated_legacy.pt`` ``pt_legacy.pt`` without its last 40 bytes
* ``pt_tampered.pt``         ``pt_clean.pt`` with one weight byte flipped (its CRC no longer matches)
* ``pt_os_system.pt``        ``pt_clean.pt`` whose data.pkl calls ``os.system("touch pt_pwned")``
* ``pt_namespace.pt``        a checkpoint holding an ``argparse.Namespace`` next to its state dict
* ``pt_huge_storage.pt``     a storage that claims 10**15 float32 elements
* ``pt_torch_layout.pt``     the state dict as torch.save lays it out (data descriptors, zip64 end records,
                             aligned entries), its serialization id zeroed and its CRCs patched to match
* ``pt_lying_sizes.pt``      issue 14's lying archive, scaled down: a 9-element tensor on a deflated storage of
                             5,000,000 zero floats whose headers declare 150 times fewer compressed bytes than
                             the 20 MB inflate to, so the old 200:1 ratio check passed it (the compressed
                             span then runs into the central directory)

:func:`opcode_heavy_pickle` builds issue 14's other case (ten million small dicts, 19.8 million opcodes) in
memory; it is 20 MB, so the tests and benchmarks/bench_hostile_pickle.py make it rather than commit it.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import pickletools
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
_DATE = (2020, 1, 1, 0, 0, 0)


class TinyNet(nn.Module):
    """conv -> batch-norm -> depthwise conv -> linear: the layer kinds auditor meets most."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, groups=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dw(torch.relu(self.bn(self.conv(x)))).mean((2, 3)))


def tiny_model() -> TinyNet:
    """The seeded TinyNet every asset is made from (its running statistics set, not default)."""
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.num_batches_tracked.fill_(3)
    return model.eval()


def rezip(data: bytes, replace: dict[str, bytes] | None = None, drop: tuple[str, ...] = ()) -> bytes:
    """``data`` (a zip) rewritten stored, with fixed dates, a zero serialization id and ``replace``d entries."""
    replace = dict(replace or {})
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if info.filename in drop:
                continue
            body = replace.pop(info.filename, None)
            if body is None:
                body = src.read(info)
                if info.filename.endswith(".data/serialization_id"):
                    body = b"0" * len(body)
            dst.writestr(zipfile.ZipInfo(info.filename, _DATE), body)
        for name, body in replace.items():
            dst.writestr(zipfile.ZipInfo(name, _DATE), body)
    return out.getvalue()


def saved(obj: object, archive: str, **kwargs: object) -> bytes:
    """``torch.save(obj)`` as bytes; zip archives named ``archive`` and normalised by :func:`rezip`."""
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)  # type: ignore[arg-type]
    data = buf.getvalue()
    if data.startswith(b"PK"):
        # torch names the archive after the file; from a buffer it is "archive"
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            renamed = {archive + i.filename[i.filename.index("/") :]: zf.read(i) for i in zf.infolist()}
        tmp = io.BytesIO()
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for name, body in renamed.items():
                zf.writestr(zipfile.ZipInfo(name, _DATE), body)
        return rezip(tmp.getvalue())
    return normalise_legacy(data)


def _torch_saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def normalise_legacy(data: bytes) -> bytes:
    """Legacy storage keys are memory addresses, and storages are written in key order:
    rename the keys by first use and rewrite the key list and the storages in that order."""
    stream = io.BytesIO(data)
    starts = []
    for _ in range(5):  # magic, protocol, sys info, main object, storage keys
        starts.append(stream.tell())
        for _op in pickletools.genops(stream):
            pass
    end = stream.tell()
    types: dict[str, str] = {}

    class Recorder(pickle.Unpickler):  # our own file: it only notes each storage's type
        def find_class(self, module: str, name: str) -> object:
            return OrderedDict if name == "OrderedDict" else name if name.endswith("Storage") else lambda *a: None

        def persistent_load(self, pid: tuple) -> None:
            types.setdefault(pid[2], pid[1])

    Recorder(io.BytesIO(data[starts[3] : starts[4]])).load()
    old_keys = pickle.loads(data[starts[4] : end])
    blocks: dict[str, bytes] = {}
    pos = end
    for key in old_keys:  # each storage: an 8-byte element count, then the elements
        numel = int.from_bytes(data[pos : pos + 8], "little")
        size = 8 + numel * _ITEMSIZE[types[key]]
        blocks[key], pos = data[pos : pos + size], pos + size
    renamed = {old: f"{i:014d}" for i, old in enumerate(types)}
    head = data[: starts[4]]
    for old, new in renamed.items():
        head = head.replace(_binunicode(old), _binunicode(new))
    keys = sorted(renamed.values())
    by_new = {new: blocks[old] for old, new in renamed.items()}
    return head + pickle.dumps(keys, protocol=2) + b"".join(by_new[k] for k in keys) + data[pos:]


_ITEMSIZE = {"FloatStorage": 4, "LongStorage": 8, "HalfStorage": 2, "BFloat16Storage": 2, "DoubleStorage": 8}


def _binunicode(text: str) -> bytes:
    return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


def scripted(model: nn.Module, archive: str) -> bytes:
    """``torch.jit.script(model).save`` as normalised bytes."""
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    data = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        renamed = {archive + i.filename[i.filename.index("/") :]: zf.read(i) for i in zf.infolist()}
    tmp = io.BytesIO()
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, body in renamed.items():
            if name.endswith(".debug_pkl"):
                continue  # source-range debug info: not needed, and it keeps the asset small
            zf.writestr(zipfile.ZipInfo(name, _DATE), body)
    return rezip(tmp.getvalue())


def os_system_pickle(command: str) -> bytes:
    """A protocol-2 pickle that calls ``os.system(command)`` when an ordinary unpickler loads it."""
    arg = command.encode()
    return b"\x80\x02cos\nsystem\nX" + len(arg).to_bytes(4, "little") + arg + b"\x85R."


def huge_storage_pickle(numel: int, size: int = 4) -> bytes:
    """data.pkl of ``{"w": tensor}`` of ``size`` elements whose storage ``'0'`` declares ``numel`` float32 elements."""
    body = (
        b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n"
        b"((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
        + b"\x8a"
        + bytes([len(_long(numel))])
        + _long(numel)
        + b"tQK\x00"
        + (b"K" + bytes([size]) if size < 256 else b"J" + size.to_bytes(4, "little"))
        + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs."
    )
    return body


def deflated_storage_zip(numel: int, used: int, archive: str = "lying", *, data_numel: int | None = None) -> bytes:
    """A checkpoint of one tensor ``w`` of ``used`` elements whose storage of ``numel`` zero float32 elements
    is a deflated entry (the rest stored), written by Python's zipfile: sizes in the local headers. The entry
    holds ``data_numel`` elements if given (a storage whose pickle and data disagree)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, body, method in (
            (f"{archive}/data.pkl", huge_storage_pickle(numel, used), zipfile.ZIP_STORED),
            (f"{archive}/byteorder", b"little", zipfile.ZIP_STORED),
            (f"{archive}/data/0", bytes(4 * (numel if data_numel is None else data_numel)), zipfile.ZIP_DEFLATED),
            (f"{archive}/version", b"3\n", zipfile.ZIP_STORED),
        ):
            zf.writestr(zipfile.ZipInfo(name, _DATE), body, compress_type=method)
    return out.getvalue()


def patch_entry(
    data: bytes,
    name: str,
    *,
    compressed: int | None = None,
    size: int | None = None,
    crc: int | None = None,
    offset: int | None = None,
    local: bool = True,
) -> bytes:
    """``data`` (a zip written by :mod:`zipfile`, no zip64) with entry ``name``'s declared CRC-32 and sizes changed
    in the central directory and, if ``local``, in its local header; ``offset`` moves only the central
    directory's pointer to the local header."""
    out = bytearray(data)
    raw = name.encode()
    central = out.index(b"PK\x01\x02")
    while out[central + 46 : central + 46 + len(raw)] != raw or struct.unpack_from("<H", out, central + 28)[0] != len(
        raw
    ):
        central = out.index(b"PK\x01\x02", central + 4)
    (header,) = struct.unpack_from("<I", out, central + 42)
    spots = [central + 16] + ([header + 14] if local else [])
    for at in spots:
        for value, field in ((crc, 0), (compressed, 4), (size, 8)):
            if value is not None:
                struct.pack_into("<I", out, at + field, value)
    if offset is not None:
        struct.pack_into("<I", out, central + 42, offset)
    return bytes(out)


def lying_sizes_zip() -> bytes:
    """Issue 14's lying archive, scaled down (see the module docstring)."""
    numel = 5_000_000
    data = deflated_storage_zip(numel, 9)
    return patch_entry(data, "lying/data/0", compressed=4 * numel // 150)


def opcode_heavy_pickle(dicts: int = 9_900_000) -> bytes:
    """Issue 14's pickle: a list of ``dicts`` empty dicts appended one by one, two opcodes and two bytes per
    dict (19.8 MB and 19.8 million opcodes by default, just under the old loader's 20-million-opcode limit)."""
    return b"\x80\x02]" + b"}a" * dicts + b"."


def torch_layout(data: bytes) -> bytes:
    """torch.save's own bytes with the random ``.data/serialization_id`` zeroed and its CRC-32 patched
    in its data descriptor and central directory entry, so that a rerun gives the same bytes."""
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(".data/serialization_id"))
    n, m = struct.unpack_from("<HH", out, info.header_offset + 26)
    start = info.header_offset + 30 + n + m
    out[start : start + info.file_size] = b"0" * info.file_size
    crc = zlib.crc32(b"0" * info.file_size)
    descriptor = start + info.file_size
    assert out[descriptor : descriptor + 4] == b"PK\x07\x08"
    struct.pack_into("<I", out, descriptor + 4, crc)
    central = out.index(b"PK\x01\x02" + out[info.header_offset + 4 : info.header_offset + 6], 0)
    raw = info.filename.encode()
    while out[central + 46 : central + 46 + len(raw)] != raw:
        central = out.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", out, central + 16, crc)
    return bytes(out)


def _long(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)


def build(out: Path = HERE) -> dict[str, bytes]:
    """Write every asset under ``out``; returns name -> bytes."""
    model = tiny_model()
    sd = model.state_dict()
    clean = saved(sd, "pt_clean")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.step()  # gives it momentum buffers: tensors that are not the state dict
    legacy = saved(sd, "pt_legacy", _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(io.BytesIO(clean)) as zf:
        first = zf.getinfo("pt_clean/data/0")
        weight = zf.read(first)
    flipped = bytes([weight[0] ^ 0x01]) + weight[1:]
    tampered = bytearray(clean)
    at = clean.index(weight)
    tampered[at : at + len(weight)] = flipped  # CRC in the headers still describes the original
    assets = {
        "pt_clean.pt": clean,
        "pt_nested.pt": saved(
            {"state_dict": sd, "epoch": 7, "arch": "tinynet", "optimizer": optimizer.state_dict()}, "pt_nested"
        ),
        "pt_legacy.pt": legacy,
        "pt_scripted.pt": scripted(model, "pt_scripted"),
        "pt_truncated.pt": clean[: len(clean) // 2],
        "pt_truncated_legacy.pt": legacy[:-40],
        "pt_tampered.pt": bytes(tampered),
        "pt_os_system.pt": rezip(clean, {"pt_clean/data.pkl": os_system_pickle("touch pt_pwned")}),
        "pt_namespace.pt": saved({"args": argparse.Namespace(lr=0.1), "state_dict": sd}, "pt_namespace"),
        "pt_huge_storage.pt": rezip(
            saved({"w": torch.zeros(4)}, "pt_huge"), {"pt_huge/data.pkl": huge_storage_pickle(10**15)}
        ),
        "pt_torch_layout.pt": torch_layout(_torch_saved(sd)),
        "pt_lying_sizes.pt": lying_sizes_zip(),
    }
    for name, data in assets.items():
        assert len(data) < 50_000, (name, len(data))
        (out / name).write_bytes(data)
    return assets


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":
        # TorchScript writes module constants in set order, which follows the string hash seed.
        os.execve(sys.executable, [sys.executable, __file__], {**os.environ, "PYTHONHASHSEED": "0"})
    for name, data in build().items():
        print(f"{name:26s} {len(data):6d} bytes")
