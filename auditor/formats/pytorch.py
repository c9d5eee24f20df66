"""PyTorch checkpoints: ``torch.save`` zip archives, pre-1.6 legacy files and TorchScript archives.

Nothing in the file is run and ``torch.load`` is never called: pickles are
read by :mod:`auditor.formats._unpickle`, whose allowlist rebuilds tensors as
records (storage key, dtype, offset, size, stride) and refuses every other
global. Weights stay in the file: stored zip entries are memory-mapped
copy-on-write on first read (their CRC checked once), compressed entries and
legacy storages are read with a bounded reader. Every size the file declares
is checked against the file before anything is allocated.
"""

from __future__ import annotations

import re
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from auditor.bases import Format
from auditor.errors import AuditorError, InputError, UnsafeInputError
from auditor.formats._io import mmap_tensor, read_exact
from auditor.formats._unpickle import (
    STORAGE_ITEMSIZE,
    Malformed,
    ScriptRecord,
    StorageRef,
    StorageType,
    TensorRecord,
    prescan,
    short_error,
    survey,
    unpickle,
)
from auditor.formats.statedict import graph_from_tensors
from auditor.graph import LayerGraph, LayerKind, TensorRef, itemsize, torch_dtype
from auditor.hookspecs import hookimpl

if TYPE_CHECKING:  # torch loads when a tensor is read, not when the format registers
    import torch

__all__ = ["LEGACY_MAGIC", "MAX_PICKLE", "STATE_DICT_KEYS", "PyTorchFormat", "load", "sniff"]

#: The legacy format's magic number, as torch.save pickles it first.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
#: Largest pickle (data.pkl, or one legacy pickle) read into memory.
MAX_PICKLE = 1 << 30
#: Keys under which training scripts nest the state dict, in order of preference.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "network", "model_state", "weights")
#: A compressed entry inflating more than this ratio (and past _RATIO_FLOOR bytes) is treated as a zip bomb.
_MAX_RATIO = 200
_RATIO_FLOOR = 16 << 20
_CHUNK = 1 << 20
_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)

_DATA_PKL = re.compile(r"[^/]+/data\.pkl\Z")
_TORCH_FIRST_ENTRY = re.compile(rb"[^/]+/(data\.pkl|data/\d+|\.data/\w+|version)\Z")
_NN = "__torch__.torch.nn.modules."
_KIND_HINTS: dict[str, LayerKind] = {
    _NN + "conv.Conv1d": LayerKind.CONV1D,
    _NN + "conv.Conv2d": LayerKind.CONV2D,
    _NN + "linear.Linear": LayerKind.LINEAR,
    _NN + "linear.NonDynamicallyQuantizableLinear": LayerKind.LINEAR,
    _NN + "batchnorm.BatchNorm1d": LayerKind.BATCH_NORM,
    _NN + "batchnorm.BatchNorm2d": LayerKind.BATCH_NORM,
    _NN + "batchnorm.BatchNorm3d": LayerKind.BATCH_NORM,
    _NN + "batchnorm.SyncBatchNorm": LayerKind.BATCH_NORM,
    _NN + "normalization.LayerNorm": LayerKind.LAYER_NORM,
    _NN + "sparse.Embedding": LayerKind.EMBEDDING,
    _NN + "rnn.LSTM": LayerKind.LSTM,
    _NN + "rnn.GRU": LayerKind.GRU,
}


# --------------------------------------------------------------------------- sniffing


def _legacy_head(head: bytes) -> bool:
    magic = b"\x8a\x0a" + LEGACY_MAGIC.to_bytes(10, "little")
    if head[:1] != b"\x80" or head[1:2] not in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return False
    # Protocol 4+ opens with a FRAME (9 bytes) before the magic number.
    return head[2:14] == magic or (head[2:3] == b"\x95" and head[11:23] == magic)


def sniff(path: Path, head: bytes) -> bool:
    """A zip with a ``<archive>/data.pkl`` entry, a damaged zip whose first entry is laid
    out as torch.save writes it, or a file opening with the legacy magic-number pickle."""
    try:
        if head.startswith(b"PK\x03\x04"):
            try:
                with zipfile.ZipFile(path) as zf:
                    return any(_DATA_PKL.match(name) for name in zf.namelist())
            except (zipfile.BadZipFile, zipfile.LargeZipFile):
                # A truncated checkpoint has lost its central directory; its first
                # local header still says what it is, so the load can say it is broken.
                with path.open("rb") as fh:
                    local = fh.read(30 + 512)
                (n,) = struct.unpack("<H", local[26:28])
                return bool(_TORCH_FIRST_ENTRY.match(local[30 : 30 + n]))
        return _legacy_head(head)
    except Exception:  # sniff must never raise: anything odd is simply "not ours"
        return False


# --------------------------------------------------------------------------- storages and readers


@dataclass(frozen=True)
class _Blob:
    """Where one storage's bytes lie in the file."""

    what: str  # "entry 'x/data/0'" or "storage '123'" for messages
    offset: int  # byte offset of the first byte (stored entries, legacy)
    nbytes: int  # bytes the file holds for it
    zip_info: zipfile.ZipInfo | None = None  # set for a compressed zip entry
    crc: int | None = None  # CRC-32 to verify on first read (stored zip entries)


def _bytes_tensor(data: bytes, dtype: str, numel: int) -> torch.Tensor:
    import torch

    if numel == 0:
        return torch.empty(0, dtype=torch_dtype(dtype))
    return torch.frombuffer(bytearray(data), dtype=torch_dtype(dtype), count=numel)


def _read_file_range(path: Path, offset: int, nbytes: int, what: str) -> bytes:
    with path.open("rb") as fh:
        fh.seek(offset)
        return read_exact(fh, nbytes, path=path, what=what)


def _inflate(path: Path, info: zipfile.ZipInfo, nbytes: int, what: str) -> bytes:
    """The first ``nbytes`` of a compressed entry, never inflating more than that."""
    _check_ratio(path, info, what)
    out = bytearray()
    with zipfile.ZipFile(path) as zf, zf.open(info) as fh:
        while len(out) < nbytes:
            chunk = fh.read(min(_CHUNK, nbytes - len(out)))
            if not chunk:
                break
            out += chunk
    if len(out) != nbytes:
        raise InputError(path, f"truncated: {what} inflates to {len(out)} bytes, {nbytes} are needed")
    return bytes(out)


def _check_ratio(path: Path, info: zipfile.ZipInfo, what: str) -> None:
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > _RATIO_FLOOR and ratio > _MAX_RATIO:
        raise InputError(
            path,
            f"{what} inflates {info.compress_size} bytes to {info.file_size} "
            f"(ratio {ratio:.0f}:1): refused as a zip bomb",
        )


def _verify_crc(path: Path, blob: _Blob) -> None:
    if blob.nbytes == 0:
        crc = 0
    else:
        import numpy as np

        data = np.memmap(path, dtype=np.uint8, mode="r", offset=blob.offset, shape=(blob.nbytes,))
        crc = zlib.crc32(data)  # type: ignore[arg-type]  # numpy arrays are buffers; the stubs disagree
    if crc != blob.crc:
        raise InputError(path, f"{blob.what} was altered: its CRC-32 is {crc:08x}, the archive records {blob.crc:08x}")


def _tensor_ref(
    path: Path, name: str, record: TensorRecord, *, dtype: str, blob: _Blob, verified: set[str], mmap: bool
) -> TensorRef:
    """A lazy TensorRef for ``record``, whose root storage's bytes are ``blob``."""
    ref = record.storage
    count = ref.view_offset + ref.numel  # elements of the root storage the view may touch

    def read() -> torch.Tensor:
        import torch

        try:
            if blob.crc is not None and blob.what not in verified:
                _verify_crc(path, blob)
                verified.add(blob.what)
            nbytes = count * itemsize(dtype)
            if blob.zip_info is not None:  # compressed: cannot be mapped
                storage = _bytes_tensor(_inflate(path, blob.zip_info, nbytes, blob.what), dtype, count)
            elif mmap:
                storage = mmap_tensor(path, blob.offset, (count,), dtype, name=name)
            else:
                storage = _bytes_tensor(_read_file_range(path, blob.offset, nbytes, f"tensor {name!r}"), dtype, count)
            return torch.as_strided(storage, record.size, record.stride, ref.view_offset + record.offset)
        except AuditorError:
            raise
        except Exception as exc:  # a file changed or damaged since load: still one line naming the tensor
            raise InputError(path, f"tensor {name!r} could not be read ({short_error(exc)})") from None

    return TensorRef(name, record.size, dtype, read)


def _check_record(path: Path, name: str, record: TensorRecord, dtype: str, blob: _Blob) -> None:
    """Sizes the pickle declares for ``name`` must fit the storage, and the storage its bytes."""
    ref = record.storage
    need = (ref.view_offset + ref.numel) * itemsize(dtype)
    if need > blob.nbytes:
        raise InputError(
            path,
            f"tensor {name!r}: storage {ref.key!r} declares {ref.numel} {dtype} elements ({need} bytes) "
            f"but {blob.what} holds {blob.nbytes} bytes",
        )
    if record.extent > ref.numel:
        raise InputError(
            path,
            f"tensor {name!r}: size {record.size} with stride {record.stride} at offset {record.offset} "
            f"reaches element {record.extent} of a storage of {ref.numel}",
        )


# --------------------------------------------------------------------------- choosing the tensors


def _tensor_items(d: dict[Any, Any]) -> list[tuple[str, TensorRecord]]:
    return [(k, v) for k, v in d.items() if isinstance(k, str) and isinstance(v, TensorRecord)]


def _select_state_dict(path: Path, root: Any) -> tuple[str | None, list[tuple[str, TensorRecord]]]:
    """``(key, tensors)``: the state dict at the top level or nested under ``key``."""
    if not isinstance(root, dict):
        raise InputError(path, f"holds no state dict: its top-level object is a {_kind(root)}")
    if root and all(isinstance(v, TensorRecord) for v in root.values()):
        return None, _tensor_items(root)
    for key in STATE_DICT_KEYS:
        value = root.get(key)
        if isinstance(value, dict) and _tensor_items(value):
            return key, _tensor_items(value)
    for key, value in root.items():
        if (
            isinstance(key, str)
            and isinstance(value, dict)
            and value
            and all(isinstance(v, TensorRecord) for v in value.values())
        ):
            return key, _tensor_items(value)
    if _tensor_items(root):
        return None, _tensor_items(root)
    keys = ", ".join(repr(k) for k in list(root)[:8])
    raise InputError(path, f"holds no state dict: no dict of tensors at the top level or under its keys ({keys})")


def _kind(obj: Any) -> str:
    return obj.torch_class() if isinstance(obj, ScriptRecord) else type(obj).__name__


def _script_tensors(root: ScriptRecord) -> tuple[list[tuple[str, TensorRecord]], dict[str, LayerKind]]:
    """Tensors of a TorchScript module tree as ``module.sub.weight`` names, in state-dict order.

    Iterative pre-order walk: a module's own tensors, then each submodule in
    attribute order. Each record is visited once (shared submodules keep their
    first name).
    """
    tensors: list[tuple[str, TensorRecord]] = []
    hints: dict[str, LayerKind] = {}
    seen: set[int] = set()
    stack: list[tuple[str, ScriptRecord]] = [("", root)]
    while stack:
        prefix, record = stack.pop()
        if id(record) in seen:
            continue
        seen.add(id(record))
        hint = _KIND_HINTS.get(record.torch_class())
        if hint is not None:
            hints[prefix] = hint
        state = record.state if isinstance(record.state, dict) else {}
        children: list[tuple[str, ScriptRecord]] = []
        for attr, value in state.items():
            if not isinstance(attr, str):
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            if isinstance(value, TensorRecord):
                tensors.append((name, value))
            elif isinstance(value, ScriptRecord):
                children.append((name, value))
        stack.extend(reversed(children))
    return tensors, hints


def _graph(
    path: Path,
    root: Any,
    blobs: Callable[[str, str, StorageRef], _Blob],
    *,
    container: str,
    mmap: bool,
    notes: list[str],
) -> LayerGraph:
    """The layer graph of an unpickled checkpoint whose storages ``blobs`` locates."""
    metadata: dict[str, Any] = {"container": container}
    hints: dict[str, LayerKind] = {}
    if isinstance(root, ScriptRecord):
        records, hints = _script_tensors(root)
        metadata["container"] = "torchscript"
        metadata["torchscript_class"] = root.torch_class()
    else:
        key, records = _select_state_dict(path, root)
        metadata["state_dict_key"] = key
    if not records:
        raise InputError(path, "holds no tensors")
    verified: set[str] = set()
    refs: list[tuple[str, TensorRef]] = []
    for name, record in records:
        dtype = record.storage.type.dtype
        if dtype is None:
            notes.append(f"tensor {name!r} is a {record.storage.type.name}, which auditor does not read; skipped")
            continue
        blob = blobs(name, dtype, record.storage)
        _check_record(path, name, record, dtype, blob)
        refs.append((name, _tensor_ref(path, name, record, dtype=dtype, blob=blob, verified=verified, mmap=mmap)))
    metadata["tensors"] = len(refs)
    return graph_from_tensors("pytorch", path, refs, files=[path], metadata=metadata, kind_hints=hints, notes=notes)


# --------------------------------------------------------------------------- zip archives


def _zip_storage(pid: tuple[Any, ...]) -> StorageRef:
    # ('storage', storage_type, key, location, numel), as torch.save and torch.jit.save write it.
    if len(pid) != 5:
        raise Malformed(f"a storage persistent id has {len(pid)} fields, not 5")
    _, stype, key, location, numel = pid
    if not isinstance(stype, StorageType):
        raise Malformed(f"a storage's type is a {type(stype).__name__}, not a torch storage class")
    if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
        raise Malformed(f"storage persistent id {str(pid)[:120]} is not (type, key, location, numel)")
    return StorageRef(key, stype, numel, location)


def _check_names(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
            raise UnsafeInputError(path, f"refused: the archive holds an entry named {name!r}, which points outside it")
    counts = Counter(info.filename for info in infos)
    dup = next((n for n, c in counts.items() if c > 1), None)
    if dup is not None:
        raise InputError(path, f"the archive holds {counts[dup]} entries named {dup!r} (tampered?)")


def _read_entry(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A whole entry, refusing one that declares more than ``limit`` bytes or inflates like a bomb."""
    what = f"entry {info.filename!r}"
    if info.file_size > limit:
        raise InputError(path, f"{what} declares {info.file_size} bytes, more than the {limit}-byte limit")
    _check_ratio(path, info, what)
    with zf.open(info) as fh:
        data = fh.read(info.file_size)  # zipfile never returns more than the declared size
    if len(data) != info.file_size:
        raise InputError(path, f"truncated: {what} holds {len(data)} of its {info.file_size} bytes")
    return data


def _entry_blob(path: Path, fh: BinaryIO, size: int, info: zipfile.ZipInfo) -> _Blob:
    """Where an entry's bytes lie: after its local header (30 bytes + name + extra field)."""
    what = f"entry {info.filename!r}"
    if info.compress_type not in _COMPRESSIONS:
        raise InputError(path, f"{what} uses compression method {info.compress_type}, which auditor does not read")
    if info.compress_type != zipfile.ZIP_STORED:
        return _Blob(what, 0, info.file_size, zip_info=info)
    fh.seek(info.header_offset)
    header = fh.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise InputError(path, f"{what}: no local file header at offset {info.header_offset}")
    n, m = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + n + m
    if info.compress_size != info.file_size:
        raise InputError(path, f"{what} is stored but declares {info.compress_size} != {info.file_size} bytes")
    if start + info.file_size > size:
        raise InputError(
            path, f"truncated: {what} needs bytes {start}..{start + info.file_size} but the file holds {size} bytes"
        )
    return _Blob(what, start, info.file_size, crc=info.CRC)


#: How many code entries a TorchScript note names one by one.
_CODE_NAMES_SHOWN = 12


def _torchscript_notes(entries: list[tuple[str, int]]) -> list[str]:
    """A note on what a TorchScript archive would run when loaded: its ``code/`` entries and ``constants.pkl``,
    from the archive's ``(name, declared size)`` pairs; none for an archive that holds neither.

    auditor reads neither, so the sizes are the ones the archive declares, unchecked."""
    inside = [(name.partition("/")[2], size) for name, size in entries]  # after the archive's own folder
    code = [(name, size) for name, size in inside if name.startswith("code/") and not name.endswith("/")]
    constants = next((size for name, size in inside if name == "constants.pkl"), None)
    if not code and constants is None:
        return []
    carried, runs = [], []
    if code:
        names = [f"{name[:120]!r} ({size:,d} B)" for name, size in code[:_CODE_NAMES_SHOWN]]
        if len(code) > _CODE_NAMES_SHOWN:
            names.append(f"{len(code) - _CODE_NAMES_SHOWN:,d} more")
        total = sum(size for _, size in code)
        carried.append(f"{len(code):,d} code entries of {total:,d} bytes ({', '.join(names)})")
        runs.append("compile and run that code")
    if constants is not None:
        carried.append(f"constants.pkl ({constants:,d} B)")
        runs.append("unpickle constants.pkl")
    torch_load = (
        ", and so would torch.load with weights_only=False, which hands an archive holding constants.pkl to"
        " torch.jit.load"
    )
    return [
        f"TorchScript: the archive carries {' and '.join(carried)}, which auditor did not read or run; "
        f"torch.jit.load would {' and '.join(runs)} when loading the model"
        + (torch_load if constants is not None else "")
    ]


def _load_zip(path: Path) -> LayerGraph:
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf, path.open("rb") as fh:
            infos = zf.infolist()
            _check_names(path, infos)
            entries = {info.filename: info for info in infos}
            pickles = [name for name in entries if _DATA_PKL.match(name)]
            if len(pickles) != 1:
                raise InputError(path, f"the archive holds {len(pickles)} data.pkl entries, expected 1")
            prefix = pickles[0][: -len("/data.pkl")]
            order = entries.get(f"{prefix}/byteorder")
            if order is not None and _read_entry(path, zf, order, 16) != b"little":
                raise InputError(path, "big-endian checkpoints are not supported")
            data = _read_entry(path, zf, entries[pickles[0]], MAX_PICKLE)
            root = unpickle(data, path=path, what="data.pkl", storage=_zip_storage)
            survey(root, path=path)
            blob_cache: dict[str, _Blob] = {}

            def blobs(name: str, dtype: str, ref: StorageRef) -> _Blob:
                entry = f"{prefix}/data/{ref.key}"
                if entry not in blob_cache:
                    info = entries.get(entry)
                    if info is None:
                        raise InputError(path, f"tensor {name!r}: storage {ref.key!r} has no entry {entry!r}")
                    blob_cache[entry] = _entry_blob(path, fh, size, info)
                return blob_cache[entry]

            notes = _torchscript_notes([(i.filename, i.file_size) for i in infos])
            return _graph(path, root, blobs, container="zip", mmap=True, notes=notes)
    except AuditorError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
        raise InputError(path, f"the zip archive is damaged or truncated ({short_error(exc)})") from None


# --------------------------------------------------------------------------- legacy files


class _Bounded:
    """A read-only view of a file that never asks for more than the file holds (pickletools reads ahead on request)."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh, self._size = fh, size

    def read(self, n: int = -1) -> bytes:
        left = max(self._size - self._fh.tell(), 0)
        return self._fh.read(left if n < 0 else min(n, left))

    def readline(self, limit: int = -1) -> bytes:
        return self._fh.readline(1 << 20 if limit < 0 else min(limit, 1 << 20))

    def tell(self) -> int:
        return self._fh.tell()


def _legacy_pickle(
    path: Path, fh: BinaryIO, size: int, what: str, storage: Callable[[tuple[Any, ...]], StorageRef]
) -> Any:
    start = fh.tell()
    span = prescan(_Bounded(fh, size), path=path, what=what)
    if span > MAX_PICKLE:
        raise InputError(path, f"{what} spans {span} bytes, more than the {MAX_PICKLE}-byte limit")
    fh.seek(start)
    return unpickle(read_exact(fh, span, path=path, what=what), path=path, what=what, storage=storage)


def _no_storage(pid: tuple[Any, ...]) -> StorageRef:
    raise Malformed("a storage where none belongs")


def _load_legacy(path: Path) -> LayerGraph:
    size = path.stat().st_size
    roots: dict[str, tuple[StorageType, int]] = {}

    def storage(pid: tuple[Any, ...]) -> StorageRef:
        # ('storage', storage_type, root_key, location, numel, view_metadata)
        if len(pid) != 6:
            raise Malformed(f"a storage persistent id has {len(pid)} fields, not 6")
        _, stype, key, location, numel, view = pid
        if not isinstance(stype, StorageType):
            raise Malformed(f"a storage's type is a {type(stype).__name__}, not a torch storage class")
        if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise Malformed(f"storage persistent id {str(pid)[:120]} is not (type, key, location, numel, view)")
        known = roots.setdefault(key, (stype, numel))
        if known != (stype, numel):
            raise Malformed(f"storage {key!r} is declared twice with different types or sizes")
        if view is None:
            return StorageRef(key, stype, numel, location)
        if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int and v >= 0 for v in view[1:])):
            raise Malformed(f"storage {key!r} has malformed view metadata")
        _, offset, view_size = view
        if offset + view_size > numel:
            raise Malformed(f"a view of storage {key!r} reaches element {offset + view_size} of {numel}")
        return StorageRef(key, stype, view_size, location, view_offset=offset)

    with path.open("rb") as fh:
        if _legacy_pickle(path, fh, size, "the magic-number pickle", _no_storage) != LEGACY_MAGIC:
            raise InputError(path, "does not start with the legacy PyTorch magic number")
        version = _legacy_pickle(path, fh, size, "the protocol-version pickle", _no_storage)
        if version != _LEGACY_PROTOCOL:
            raise InputError(path, f"legacy protocol version {version!r} is not {_LEGACY_PROTOCOL}")
        info = _legacy_pickle(path, fh, size, "the sys-info pickle", _no_storage)
        if not isinstance(info, dict) or not isinstance(info.get("little_endian"), bool):
            raise InputError(path, "the sys-info pickle is not a dict with a little_endian flag")
        if not info["little_endian"]:
            raise InputError(path, "big-endian checkpoints are not supported")
        root = _legacy_pickle(path, fh, size, "the main pickle", storage)
        survey(root, path=path)
        keys = _legacy_pickle(path, fh, size, "the storage-key pickle", _no_storage)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
            raise InputError(path, "the storage-key pickle is not a list of distinct strings")
        # Storages follow back to back: an 8-byte little-endian element count, then the data.
        layout: dict[str, _Blob] = {}
        for key in keys:
            if key not in roots:
                raise InputError(path, f"storage {key!r} is listed but no object uses it, so its size is unknown")
            stype, numel = roots[key]
            pos = fh.tell()
            (stored,) = struct.unpack("<q", read_exact(fh, 8, path=path, what=f"the size of storage {key!r}"))
            if stored != numel:
                raise InputError(path, f"storage {key!r}: its header says {stored} elements, the pickle {numel}")
            nbytes = numel * STORAGE_ITEMSIZE[stype.name]
            if pos + 8 + nbytes > size:
                raise InputError(
                    path,
                    f"truncated: storage {key!r} needs bytes {pos + 8}..{pos + 8 + nbytes}, the file holds {size}",
                )
            layout[key] = _Blob(f"storage {key!r}", pos + 8, nbytes)
            fh.seek(pos + 8 + nbytes)

    def blobs(name: str, dtype: str, ref: StorageRef) -> _Blob:
        if ref.key not in layout:
            raise InputError(path, f"tensor {name!r}: storage {ref.key!r} is missing from the file's storage list")
        return layout[ref.key]

    return _graph(path, root, blobs, container="legacy", mmap=False, notes=[])


# --------------------------------------------------------------------------- entry points


def load(path: Path) -> LayerGraph:
    """Read a PyTorch checkpoint or TorchScript archive into a layer graph (weights stay in the file).

    Raises InputError for a broken file and UnsafeInputError for one holding
    anything but tensors, storages and plain containers.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(64)
        if head.startswith(b"PK\x03\x04"):
            return _load_zip(path)
        if _legacy_head(head):
            return _load_legacy(path)
        raise InputError(path, "neither a torch.save zip archive nor a legacy PyTorch file")
    except AuditorError:
        raise
    except MemoryError:
        raise InputError(path, "declares more data than can be held in memory") from None
    except Exception as exc:  # hostile bytes must still end as one line naming the file
        raise InputError(path, f"could not be read as a PyTorch checkpoint ({short_error(exc)})") from None


class PyTorchFormat(Format):
    """torch.save checkpoints (zip and legacy) and TorchScript archives."""

    id = "pytorch"
    description = "PyTorch checkpoint (torch.save zip or legacy) or TorchScript archive, read without unpickling code"
    priority = 20

    def sniff(self, path: Path, head: bytes) -> bool:
        return sniff(path, head)

    def load(self, path: Path) -> LayerGraph:
        return load(path)


@hookimpl
def register_formats(register: Callable[[Format], None]) -> None:
    """Register the PyTorch format."""
    register(PyTorchFormat())
