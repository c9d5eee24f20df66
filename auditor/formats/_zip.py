"""A strict reader for the zip archives that ``torch.save`` and ``torch.jit.save`` write.

Python's :mod:`zipfile` trusts an archive: it inflates whatever the central
directory points at, decodes names it is told are UTF-8 with an exception
when they are not, and never compares an entry's local header with the
central directory. A checkpoint handed to auditor may be made to lie, so this
reader checks what it is given before anything is inflated or mapped:

* the central directory is read whole only when it is no larger than
  :data:`MAX_CENTRAL_DIRECTORY` and lists at most :data:`MAX_ENTRIES` entries;
* every entry's local header must agree with the central directory (name,
  method, and CRC-32 and sizes where the header or the data descriptor
  after the data records them), and no two entries, nor an entry and the
  central directory, may share a byte;
* only the methods ``torch.load`` reads are read: stored and deflated;
* a deflated entry is inflated streaming into a buffer the caller sized from
  what its tensors need, never further; read to its end, it must end exactly
  at its declared sizes with its CRC-32.

Every refusal is an :class:`~auditor.errors.InputError` naming the entry and
the byte offset.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from auditor.errors import InputError
from auditor.safeio import open_regular

__all__ = [
    "MAX_CENTRAL_DIRECTORY",
    "MAX_ENTRIES",
    "Entry",
    "inflate_into",
    "read_directory",
    "read_entry",
    "verify_stored_crc",
]

#: Largest central directory read (torch writes about 100 bytes per storage).
MAX_CENTRAL_DIRECTORY = 64 << 20
#: Most entries one archive may list (one per storage, plus a few; the pickle's budget admits about 200,000).
MAX_ENTRIES = 300_000
STORED, DEFLATED = 0, 8
_CHUNK = 1 << 20
_EOCD, _EOCD64, _LOCATOR = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"
_CENTRAL, _LOCAL, _DESCRIPTOR = b"PK\x01\x02", b"PK\x03\x04", b"PK\x07\x08"
_MAX32 = 0xFFFFFFFF
_UTF8 = 0x800
_HAS_DESCRIPTOR = 0x8
_ENCRYPTED = 0x1


@dataclass(frozen=True, slots=True)
class Entry:
    """One checked entry: where its (compressed) bytes lie and what they must inflate to."""

    name: str
    header_offset: int
    data_offset: int  # first byte of the compressed data
    compressed: int
    size: int
    crc: int
    method: int

    @property
    def what(self) -> str:
        """``entry 'name'``, for messages."""
        return f"entry {self.name!r}"


def _damaged(path: Path, problem: str) -> InputError:
    return InputError(path, f"the zip archive is damaged or truncated: {problem}")


def _end_record(path: Path, fh: BinaryIO, size: int) -> tuple[int, int, int]:
    """``(central directory offset, its size, where the records after it start)`` from the end record."""
    tail_len = min(size, 22 + 0xFFFF)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    at = tail.rfind(_EOCD)
    while at >= 0 and at + 22 > len(tail):
        at = tail.rfind(_EOCD, 0, at)
    if at < 0:
        raise _damaged(path, "it has no end-of-central-directory record")
    cd_size, cd_offset = struct.unpack("<II", tail[at + 12 : at + 20])
    limit = size - tail_len + at
    if at >= 20 and tail[at - 20 : at - 16] == _LOCATOR:
        (record,) = struct.unpack("<Q", tail[at - 12 : at - 4])
        z64 = b""
        if record + 56 <= limit:
            fh.seek(record)
            z64 = fh.read(56)
        if len(z64) != 56 or z64[:4] != _EOCD64:
            raise _damaged(path, f"its zip64 end record at byte {record} is missing or malformed")
        cd_size, cd_offset = struct.unpack("<QQ", z64[40:56])
        limit = record
    if cd_offset + cd_size > limit:
        raise _damaged(
            path,
            f"its central directory (bytes {cd_offset}..{cd_offset + cd_size}) runs past its end record at {limit}",
        )
    return cd_offset, cd_size, limit


def _zip64(extra: bytes, want: list[bool], where: str, path: Path) -> list[int]:
    """The 8-byte values a zip64 extra field holds for the fields ``want`` marks (in the order of the format)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, n = struct.unpack("<HH", extra[pos : pos + 4])
        if tag == 1:
            body = extra[pos + 4 : pos + 4 + n]
            if len(body) < 8 * sum(want):
                break
            return [v for (v,) in struct.iter_unpack("<Q", body[: 8 * sum(want)])]
        pos += 4 + n
    raise _damaged(path, f"{where} needs a zip64 extra field and has none")


def _central_entries(
    path: Path, directory: bytes, cd_offset: int, *, strict: bool = True
) -> Iterator[tuple[Entry, bytes, int]]:
    """(entry as the central directory says, raw name, flags) for each record of ``directory``, in turn.

    Not ``strict``: names are decoded with replacement characters and entries are not checked (sniffing).
    """
    pos = count = 0
    while pos < len(directory):
        where = f"central directory record at byte {cd_offset + pos}"
        if directory[pos : pos + 4] != _CENTRAL or pos + 46 > len(directory):
            raise _damaged(path, f"no {where}")
        flags, method, crc, csize, usize, n, m, k = struct.unpack("<HH4xIIIHHH", directory[pos + 8 : pos + 34])
        (offset,) = struct.unpack("<I", directory[pos + 42 : pos + 46])
        if pos + 46 + n + m + k > len(directory):
            raise _damaged(path, f"the {where} runs past the directory's end")
        raw = directory[pos + 46 : pos + 46 + n]
        extra = directory[pos + 46 + n : pos + 46 + n + m]
        try:
            name = raw.decode("utf-8", "strict" if strict else "replace") if flags & _UTF8 else raw.decode("cp437")
        except UnicodeDecodeError:
            raise InputError(
                path, f"the {where} names an entry {raw[:60]!r} that is not valid UTF-8, though flagged so"
            ) from None
        want = [usize == _MAX32, csize == _MAX32, offset == _MAX32]
        if any(want) and strict:
            values = iter(_zip64(extra, want, f"entry {name!r}", path))
            usize = next(values) if want[0] else usize
            csize = next(values) if want[1] else csize
            offset = next(values) if want[2] else offset
        what = f"entry {name!r}"
        if strict and flags & _ENCRYPTED:
            raise InputError(path, f"{what} is encrypted")
        if strict and method not in (STORED, DEFLATED):
            raise InputError(path, f"{what} uses compression method {method}, which auditor does not read")
        if strict and method == STORED and csize != usize:
            raise InputError(path, f"{what} is stored but declares {csize} != {usize} bytes")
        count += 1
        if count > MAX_ENTRIES:
            raise InputError(path, f"the archive lists more than {MAX_ENTRIES} entries")
        yield Entry(name, offset, 0, csize, usize, crc, method), raw, flags
        pos += 46 + n + m + k


def _local(path: Path, fh: BinaryIO, entry: Entry, raw: bytes, cd_offset: int) -> tuple[Entry, int]:
    """``entry`` with its data offset, checked against its local header; and where its bytes end
    (after the data descriptor, if any)."""
    what = entry.what
    header = b""
    if entry.header_offset + 30 <= cd_offset:
        fh.seek(entry.header_offset)
        header = fh.read(30)
    if len(header) != 30 or header[:4] != _LOCAL:
        raise InputError(path, f"{what}: no local file header at byte {entry.header_offset}")
    flags, method, crc, csize, usize, n, m = struct.unpack("<6xHH4xIIIHH", header)
    name_extra = fh.read(n + m)
    if name_extra[:n] != raw:
        raise InputError(
            path, f"{what}: its local header at byte {entry.header_offset} names {name_extra[:n][:60]!r} instead"
        )
    if method != entry.method:
        raise InputError(path, f"{what}: its local header says method {method}, the central directory {entry.method}")
    if flags & _ENCRYPTED:
        raise InputError(path, f"{what} is encrypted")
    data = entry.header_offset + 30 + n + m
    end = data + entry.compressed
    if end > cd_offset:
        raise InputError(
            path,
            f"{what} (bytes {data}..{end}) runs into the central directory at byte {cd_offset}: "
            "the archive is truncated or its sizes lie",
        )
    declared = (crc, csize, usize)
    if flags & _HAS_DESCRIPTOR:  # the sizes follow the data
        fh.seek(end)
        tail = fh.read(24)
        body = tail[4:] if tail[:4] == _DESCRIPTOR else tail
        start = len(tail) - len(body)
        for fmt, length in (("<III", 12), ("<IQQ", 20)):
            if len(body) >= length and struct.unpack(fmt, body[:length]) == (entry.crc, entry.compressed, entry.size):
                return _with_data(entry, data), end + start + length
        raise InputError(
            path, f"{what}: its data descriptor at byte {end} disagrees with the central directory (tampered?)"
        )
    if _MAX32 in (usize, csize):
        want = [usize == _MAX32, csize == _MAX32]
        values = iter(_zip64(name_extra[n:], want, what, path))
        usize = next(values) if want[0] else usize
        csize = next(values) if want[1] else csize
        declared = (crc, csize, usize)
    if declared != (entry.crc, entry.compressed, entry.size):
        raise InputError(
            path,
            f"{what}: its local header at byte {entry.header_offset} declares CRC {crc:08x}, {csize} bytes "
            f"compressed, {usize} bytes; the central directory {entry.crc:08x}, {entry.compressed}, {entry.size} "
            "(tampered?)",
        )
    return _with_data(entry, data), end


def _with_data(entry: Entry, data_offset: int) -> Entry:
    return Entry(entry.name, entry.header_offset, data_offset, entry.compressed, entry.size, entry.crc, entry.method)


def read_directory(path: Path, fh: BinaryIO, size: int) -> list[Entry]:
    """Every entry of the archive open as ``fh`` (``size`` bytes), checked as the module says, in file order."""
    cd_offset, cd_size, _ = _end_record(path, fh, size)
    if cd_size > MAX_CENTRAL_DIRECTORY:
        raise InputError(
            path,
            f"the archive's central directory is {cd_size} bytes, more than the {MAX_CENTRAL_DIRECTORY}-byte limit",
        )
    fh.seek(cd_offset)
    directory = fh.read(cd_size)
    if len(directory) != cd_size:
        raise _damaged(path, f"its central directory needs bytes {cd_offset}..{cd_offset + cd_size}")
    central = list(_central_entries(path, directory, cd_offset))
    del directory
    central.sort(key=lambda item: item[0].header_offset)
    entries: list[Entry] = []
    previous_end, previous = 0, ""
    for entry, raw, _flags in central:
        if entry.header_offset < previous_end:
            raise InputError(
                path,
                f"{entry.what} starts at byte {entry.header_offset}, inside {previous} (which ends at {previous_end}): "
                "entries overlap (tampered?)",
            )
        checked, previous_end = _local(path, fh, entry, raw, cd_offset)
        if previous_end > cd_offset:
            raise InputError(
                path, f"{entry.what}'s data descriptor runs into the central directory at byte {cd_offset}"
            )
        previous = entry.what
        entries.append(checked)
    return entries


def names(path: Path, fh: BinaryIO, size: int) -> Iterator[str]:
    """The entry names the central directory lists, in turn, without checking the entries (for sniffing)."""
    cd_offset, cd_size, _ = _end_record(path, fh, size)
    if cd_size > MAX_CENTRAL_DIRECTORY:
        return iter(())
    fh.seek(cd_offset)
    return (entry.name for entry, _, _ in _central_entries(path, fh.read(cd_size), cd_offset, strict=False))


def read_entry(path: Path, fh: BinaryIO, entry: Entry, limit: int) -> bytes:
    """A whole entry, verified (sizes, end of stream, CRC-32); refuses one that declares more than ``limit`` bytes."""
    if entry.size > limit:
        raise InputError(path, f"{entry.what} declares {entry.size} bytes, more than the {limit}-byte limit")
    if entry.method == STORED:
        fh.seek(entry.data_offset)
        data = fh.read(entry.size)
        if len(data) != entry.size:
            raise InputError(path, f"truncated: {entry.what} holds {len(data)} of its {entry.size} bytes")
        _check_crc(path, entry, zlib.crc32(data))
        return data
    out = bytearray(entry.size)
    inflate_into(path, fh, entry, memoryview(out))
    return bytes(out)


def _check_crc(path: Path, entry: Entry, crc: int) -> None:
    if crc != entry.crc:
        raise InputError(
            path, f"{entry.what} was altered: its CRC-32 is {crc:08x}, the archive records {entry.crc:08x}"
        )


def inflate_into(path: Path, fh: BinaryIO, entry: Entry, out: memoryview) -> None:
    """Inflate the first ``len(out)`` bytes of deflated ``entry`` into ``out``, reading no further.

    When ``out`` covers the whole entry, the deflate stream must end exactly
    there, at the compressed size the archive declares, with the declared
    CRC-32. Memory beyond ``out``: one compressed chunk and one inflated chunk.
    """
    need, full = len(out), len(out) == entry.size
    what = entry.what
    inflater = zlib.decompressobj(-15)
    fh.seek(entry.data_offset)
    left = entry.compressed  # compressed bytes not yet read
    pending = b""
    got, crc = 0, 0
    try:
        while got < need and not inflater.eof:
            read = b""
            if not pending and left:
                read = fh.read(min(_CHUNK, left))
                if not read:
                    raise InputError(path, f"truncated: {what} ends {left} bytes before its declared compressed size")
                left -= len(read)
                pending = read
            chunk = inflater.decompress(pending, min(_CHUNK, need - got))
            progress = bool(chunk) or bool(read) or len(inflater.unconsumed_tail) != len(pending)
            pending = inflater.unconsumed_tail
            out[got : got + len(chunk)] = chunk
            got += len(chunk)
            if full:
                crc = zlib.crc32(chunk, crc)
            if not progress:
                break
        if got < need:
            raise InputError(
                path,
                f"{what} inflates to {got} bytes, fewer than the {need} its tensors need (it declares {entry.size})",
            )
        if not full:
            return
        while not inflater.eof:  # the stream must end here: any further byte means the declared size lies
            read = b""
            if not pending and left:
                read = fh.read(min(_CHUNK, left))
                if not read:
                    break
                left -= len(read)
                pending = read
            before = len(pending)
            if inflater.decompress(pending, 1):
                raise InputError(path, f"{what} inflates to more than the {entry.size} bytes it declares (tampered?)")
            pending = inflater.unconsumed_tail
            if not read and len(pending) == before:
                break
    except zlib.error as exc:
        raise InputError(path, f"{what} is not valid deflate data at inflated byte {got} ({exc})") from None
    if not inflater.eof:
        raise InputError(path, f"truncated: {what}'s deflate stream does not end within its {entry.compressed} bytes")
    unused = left + len(pending) + len(inflater.unused_data)
    if unused:
        raise InputError(
            path,
            f"{what} declares {entry.compressed} compressed bytes but its deflate stream ends "
            f"{unused} bytes earlier (tampered?)",
        )
    _check_crc(path, entry, crc)


def verify_stored_crc(path: Path, entry: Entry) -> None:
    """Check a stored entry's CRC-32 over the file, through a read-only memory map (no copy in memory)."""
    if entry.size == 0:
        _check_crc(path, entry, 0)
        return
    start = entry.data_offset - entry.data_offset % mmap.ALLOCATIONGRANULARITY
    with (
        open_regular(path, what="a model file") as fh,
        mmap.mmap(fh.fileno(), entry.data_offset + entry.size - start, access=mmap.ACCESS_READ, offset=start) as mapped,
    ):
        view = memoryview(mapped)
        try:
            crc = 0
            for at in range(entry.data_offset - start, entry.data_offset - start + entry.size, 1 << 24):
                crc = zlib.crc32(view[at : min(at + (1 << 24), entry.data_offset - start + entry.size)], crc)
        finally:
            view.release()
    _check_crc(path, entry, crc)
