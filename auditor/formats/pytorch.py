"""PyTorch checkpoints: ``torch.save`` zip archives, pre-1.6 legacy files and TorchScript archives.

Nothing in the file is run and ``torch.load`` is never called: pickles are
read by :mod:`auditor.formats._unpickle`, whose allowlist rebuilds tensors as
records (storage key, dtype, offset, size, stride) and refuses every other
global, within a budget of opcodes and memory checked before unpickling.
Zip archives are read by :mod:`auditor.formats._zip`, which refuses an
archive whose central directory and local headers disagree or whose entries
overlap. Weights stay in the file: stored zip entries are memory-mapped
copy-on-write on first read (their CRC checked once), deflated entries are
inflated streaming and legacy storages read, each only as far as the tensor
being read reaches. Every size the file declares is checked against the file
before anything is allocated.
"""

from __future__ import annotations

import itertools
import math
import re
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from auditor.bases import Format
from auditor.errors import AuditorError, InputError, LoaderBugError, UnsafeInputError
from auditor.formats import _zip
from auditor.formats._io import mmap_tensor, read_exact
from auditor.formats._unpickle import (
    STORAGE_ITEMSIZE,
    Malformed,
    ScriptRecord,
    StorageRef,
    StorageType,
    TensorRecord,
    Truncated,
    scan,
    short_error,
    show,
    survey,
    unpickle,
)
from auditor.formats.statedict import graph_from_tensors
from auditor.graph import LayerGraph, LayerKind, TensorRef, itemsize, torch_dtype
from auditor.hookspecs import hookimpl
from auditor.safeio import open_regular

if TYPE_CHECKING:  # torch loads when a tensor is read, not when the format registers
    import torch

__all__ = ["LEGACY_MAGIC", "MAX_PICKLE", "STATE_DICT_KEYS", "PyTorchFormat", "load", "sniff"]

#: The legacy format's magic number, as torch.save pickles it first.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
#: Largest pickle (data.pkl, or one legacy pickle) read into memory.
MAX_PICKLE = 256 << 20
#: Keys under which training scripts nest the state dict, in order of preference.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "network", "model_state", "weights")
#: A deflated entry inflating more than this ratio (and past _RATIO_FLOOR bytes) is treated as a zip bomb.
_MAX_RATIO = 200
_RATIO_FLOOR = 16 << 20
_LEGACY_FIRST_READ = 1 << 16

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
            with open_regular(path, what="a model file") as fh:
                try:  # torch writes data.pkl first: this stops at the first record
                    if any(_DATA_PKL.match(name) for name in _zip.names(path, fh, path.stat().st_size)):
                        return True
                except InputError:
                    pass
                # A truncated checkpoint has lost its central directory; its first
                # local header still says what it is, so the load can say it is broken.
                fh.seek(0)
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
    entry: _zip.Entry | None = None  # set for a zip entry
    mappable: bool = False  # stored in a zip: read through a memory map


def _verify_crc(path: Path, entry: _zip.Entry) -> None:
    _zip.verify_stored_crc(path, entry)


def _inflate(path: Path, entry: _zip.Entry, out: memoryview) -> None:
    with open_regular(path, what="a model file") as fh:
        _zip.inflate_into(path, fh, entry, out)


def _read_file_range(path: Path, offset: int, out: memoryview, what: str) -> None:
    with open_regular(path, what="a model file") as fh:
        fh.seek(offset)
        got = fh.readinto(out)
    if got != len(out):
        raise InputError(path, f"truncated: {what} needs {len(out)} bytes, the file has {got} left")


def _tensor_ref(
    path: Path, name: str, record: TensorRecord, *, dtype: str, blob: _Blob, verified: set[str]
) -> TensorRef:
    """A lazy TensorRef for ``record``, whose root storage's bytes are ``blob``.

    A read maps or reads only the elements the tensor reaches (``view_offset + extent``),
    never the rest of its storage: a 9-element tensor of a 3 GiB storage costs 36 bytes.
    """
    ref = record.storage
    count = ref.view_offset + record.extent  # elements of the root storage this tensor reaches
    nbytes = count * itemsize(dtype)

    def read() -> torch.Tensor:
        import torch

        try:
            if record.extent == 0:
                return torch.empty(record.size, dtype=torch_dtype(dtype))
            entry = blob.entry
            if blob.mappable and entry is not None:
                if blob.what not in verified:
                    _verify_crc(path, entry)
                    verified.add(blob.what)
                storage = mmap_tensor(path, blob.offset, (count,), dtype, name=name)
            else:
                raw = torch.empty(nbytes, dtype=torch.uint8)
                if entry is not None:  # deflated: inflated up to what this tensor reaches, no further
                    _inflate(path, entry, raw.numpy().data)
                else:
                    _read_file_range(path, blob.offset, raw.numpy().data, f"tensor {show(name)}")
                storage = raw.view(torch_dtype(dtype))
            return torch.as_strided(storage, record.size, record.stride, ref.view_offset + record.offset)
        except AuditorError:
            raise
        except OSError as exc:  # the file changed or went away since it was loaded
            raise InputError(path, f"tensor {show(name)} could not be read ({exc.strerror or exc})") from None
        except MemoryError:
            raise InputError(
                path, f"tensor {show(name)} needs {nbytes} bytes, more than the memory available"
            ) from None
        except Exception as exc:  # a loader bug: still one line naming the tensor, and a failure for the fuzz tests
            raise LoaderBugError(path, f"tensor {show(name)} could not be read ({short_error(exc)})") from exc

    return TensorRef(name, record.size, dtype, read)


#: A view whose strides repeat its storage's elements (stride 0) may not stand for more bytes than this.
_MAX_REPEATED = 1 << 30


def _check_record(path: Path, name: str, record: TensorRecord, dtype: str, blob: _Blob) -> None:
    """Sizes the pickle declares for ``name`` must fit the storage, and the storage its bytes."""
    ref = record.storage
    need = (ref.view_offset + ref.numel) * itemsize(dtype)
    if need > blob.nbytes:
        raise InputError(
            path,
            f"tensor {show(name)}: storage {show(ref.key)} declares {ref.numel} {dtype} elements ({need} bytes) "
            f"but {blob.what} holds {blob.nbytes} bytes",
        )
    if record.extent > ref.numel:
        raise InputError(
            path,
            f"tensor {show(name)}: size {record.size} with stride {record.stride} at offset {record.offset} "
            f"reaches element {record.extent} of a storage of {ref.numel}",
        )
    numel = math.prod(record.size)
    if numel > max(record.extent, _MAX_REPEATED // itemsize(dtype)):
        raise InputError(
            path,
            f"tensor {show(name)}: size {record.size} with stride {record.stride} repeats {record.extent} stored "
            f"elements as {numel}: refused (reading it would take {numel * itemsize(dtype)} bytes)",
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
    keys = ", ".join(show(k, 40) for k in itertools.islice(root, 8))
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
    reach: dict[_Blob, int] = {}  # deflated entries: the most bytes any tensor reads of them
    for name, record in records:
        dtype = record.storage.type.dtype
        if dtype is None:
            notes.append(f"tensor {show(name)} is a {record.storage.type.name}, which auditor does not read; skipped")
            continue
        blob = blobs(name, dtype, record.storage)
        _check_record(path, name, record, dtype, blob)
        if blob.entry is not None and not blob.mappable:
            used = (record.storage.view_offset + record.extent) * itemsize(dtype)
            reach[blob] = max(reach.get(blob, 0), used)
        refs.append((name, _tensor_ref(path, name, record, dtype=dtype, blob=blob, verified=verified)))
    for blob, used in reach.items():
        if used < blob.nbytes:
            notes.append(
                f"{blob.what} declares {blob.nbytes} bytes but its tensors reach only the first {used}: "
                "the rest is never inflated, so its size and CRC-32 are not checked"
            )
    metadata["tensors"] = len(refs)
    return graph_from_tensors("pytorch", path, refs, files=[path], metadata=metadata, kind_hints=hints, notes=notes)


# --------------------------------------------------------------------------- zip archives


def _zip_storage(pid: tuple[Any, ...]) -> StorageRef:
    # ('storage', storage_type, key, location, numel), as torch.save and torch.jit.save write it.
    if len(pid) != 5:
        raise Malformed(f"a storage persistent id has {len(pid)} fields, not 5")
    _, stype, key, location, numel = pid
    if not isinstance(stype, StorageType):
        raise Malformed(f"a storage's type is {show(stype)}, not a torch storage class")
    if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
        raise Malformed(f"storage persistent id {show(pid)} is not (type, key, location, numel)")
    return StorageRef(key, stype, numel, location)


def _check_names(path: Path, entries: list[_zip.Entry]) -> None:
    for entry in entries:
        name = entry.name
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
            raise UnsafeInputError(
                path, f"refused: the archive holds an entry named {show(name)}, which points outside it"
            )
    counts = Counter(entry.name for entry in entries)
    dup = next((n for n, c in counts.items() if c > 1), None)
    if dup is not None:
        raise InputError(path, f"the archive holds {counts[dup]} entries named {show(dup)} (tampered?)")


def _check_ratio(path: Path, entry: _zip.Entry) -> None:
    ratio = entry.size / max(entry.compressed, 1)
    if entry.method == _zip.DEFLATED and entry.size > _RATIO_FLOOR and ratio > _MAX_RATIO:
        raise InputError(
            path,
            f"{entry.what} inflates {entry.compressed} bytes to {entry.size} "
            f"(ratio {ratio:.0f}:1): refused as a zip bomb",
        )


def _entry_blob(path: Path, entry: _zip.Entry) -> _Blob:
    """Where a storage entry's bytes lie (the zip reader has checked them against the file)."""
    _check_ratio(path, entry)
    return _Blob(entry.what, entry.data_offset, entry.size, entry=entry, mappable=entry.method == _zip.STORED)


#: How many code entries a TorchScript note names one by one.
_CODE_NAMES_SHOWN = 12


def torchscript_code_notes(entries: list[_zip.Entry]) -> list[str]:
    """A note on what a TorchScript archive would run when loaded: its ``code/`` entries and ``constants.pkl``;
    none for an archive that holds neither.

    auditor reads neither, so the sizes are the ones the archive declares, unchecked."""
    inside = [(e.name.partition("/")[2], e.size) for e in entries]  # after the archive's own folder
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


def _read_whole(path: Path, fh: BinaryIO, entry: _zip.Entry, limit: int) -> bytes:
    _check_ratio(path, entry)
    return _zip.read_entry(path, fh, entry, limit)


def _load_zip(path: Path) -> LayerGraph:
    with open_regular(path, what="a model file") as fh:
        listed = _zip.read_directory(path, fh, path.stat().st_size)
        _check_names(path, listed)
        entries = {entry.name: entry for entry in listed}
        pickles = [name for name in entries if _DATA_PKL.match(name)]
        if len(pickles) != 1:
            raise InputError(path, f"the archive holds {len(pickles)} data.pkl entries, expected 1")
        prefix = pickles[0][: -len("/data.pkl")]
        order = entries.get(f"{prefix}/byteorder")
        if order is not None and _read_whole(path, fh, order, 16) != b"little":
            raise InputError(path, "big-endian checkpoints are not supported")
        data = _read_whole(path, fh, entries[pickles[0]], MAX_PICKLE)
    root = unpickle(data, path=path, what="data.pkl", storage=_zip_storage)
    del data
    survey(root, path=path)
    blob_cache: dict[str, _Blob] = {}

    def blobs(name: str, dtype: str, ref: StorageRef) -> _Blob:
        entry = f"{prefix}/data/{ref.key}"
        if entry not in blob_cache:
            found = entries.get(entry)
            if found is None:
                raise InputError(path, f"tensor {show(name)}: storage {show(ref.key)} has no entry {show(entry)}")
            blob_cache[entry] = _entry_blob(path, found)
        return blob_cache[entry]

    return _graph(path, root, blobs, container="zip", notes=torchscript_code_notes(listed))


# --------------------------------------------------------------------------- legacy files


def _legacy_pickle(
    path: Path, fh: BinaryIO, size: int, what: str, storage: Callable[[tuple[Any, ...]], StorageRef]
) -> Any:
    """The pickle that starts at ``fh``'s position, read by scanning ever longer stretches of the file
    (a legacy file does not say where its pickles end); ``fh`` is left just after it."""
    start = fh.tell()
    want = _LEGACY_FIRST_READ
    while True:
        fh.seek(start)
        chunk = fh.read(min(want, MAX_PICKLE + 1))
        try:
            found = scan(chunk, path=path, what=what)
            break
        except Truncated:
            if len(chunk) > MAX_PICKLE:
                raise InputError(path, f"{what} spans more than the {MAX_PICKLE}-byte limit") from None
            if start + len(chunk) >= size:
                raise InputError(path, f"{what} is truncated: the file ends before its STOP opcode") from None
            want *= 4
    data = chunk if found.end == len(chunk) else chunk[: found.end]
    del chunk  # the rest of the stretch read (storages, other pickles) is not kept
    fh.seek(start + found.end)
    return unpickle(data, path=path, what=what, storage=storage, scanned=found)


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
            raise Malformed(f"a storage's type is {show(stype)}, not a torch storage class")
        if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise Malformed(f"storage persistent id {show(pid)} is not (type, key, location, numel, view)")
        known = roots.setdefault(key, (stype, numel))
        if known != (stype, numel):
            raise Malformed(f"storage {show(key)} is declared twice with different types or sizes")
        if view is None:
            return StorageRef(key, stype, numel, location)
        if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int and v >= 0 for v in view[1:])):
            raise Malformed(f"storage {show(key)} has malformed view metadata")
        _, offset, view_size = view
        if offset + view_size > numel:
            raise Malformed(f"a view of storage {show(key)} reaches element {offset + view_size} of {numel}")
        return StorageRef(key, stype, view_size, location, view_offset=offset)

    with open_regular(path, what="a model file") as fh:
        if _legacy_pickle(path, fh, size, "the magic-number pickle", _no_storage) != LEGACY_MAGIC:
            raise InputError(path, "does not start with the legacy PyTorch magic number")
        version = _legacy_pickle(path, fh, size, "the protocol-version pickle", _no_storage)
        if type(version) is not int or version != _LEGACY_PROTOCOL:
            raise InputError(path, f"legacy protocol version {show(version)} is not {_LEGACY_PROTOCOL}")
        info = _legacy_pickle(path, fh, size, "the sys-info pickle", _no_storage)
        if not isinstance(info, dict) or not isinstance(info.get("little_endian"), bool):
            raise InputError(path, "the sys-info pickle is not a dict with a little_endian flag")
        if not info["little_endian"]:
            raise InputError(path, "big-endian checkpoints are not supported")
        root = _legacy_pickle(path, fh, size, "the main pickle", storage)
        survey(root, path=path)
        keys = _legacy_pickle(path, fh, size, "the storage-key pickle", _no_storage)
        if not isinstance(keys, list) or not all(type(k) is str for k in keys) or len(set(keys)) != len(keys):
            raise InputError(path, "the storage-key pickle is not a list of distinct strings")
        # Storages follow back to back: an 8-byte little-endian element count, then the data.
        layout: dict[str, _Blob] = {}
        for key in keys:
            if key not in roots:
                raise InputError(path, f"storage {show(key)} is listed but no object uses it, so its size is unknown")
            stype, numel = roots[key]
            pos = fh.tell()
            (stored,) = struct.unpack("<q", read_exact(fh, 8, path=path, what=f"the size of storage {show(key)}"))
            if stored != numel:
                raise InputError(path, f"storage {show(key)}: its header says {stored} elements, the pickle {numel}")
            nbytes = numel * STORAGE_ITEMSIZE[stype.name]
            if pos + 8 + nbytes > size:
                raise InputError(
                    path,
                    f"truncated: storage {show(key)} needs bytes {pos + 8}..{pos + 8 + nbytes}, the file holds {size}",
                )
            layout[key] = _Blob(f"storage {show(key)}", pos + 8, nbytes)
            fh.seek(pos + 8 + nbytes)

    def blobs(name: str, dtype: str, ref: StorageRef) -> _Blob:
        if ref.key not in layout:
            raise InputError(
                path, f"tensor {show(name)}: storage {show(ref.key)} is missing from the file's storage list"
            )
        return layout[ref.key]

    return _graph(path, root, blobs, container="legacy", notes=[])


# --------------------------------------------------------------------------- entry points


def load(path: Path) -> LayerGraph:
    """Read a PyTorch checkpoint or TorchScript archive into a layer graph (weights stay in the file).

    Raises InputError for a broken file and UnsafeInputError for one holding
    anything but tensors, storages and plain containers. An exception this
    loader does not raise on purpose is a bug: it becomes LoaderBugError
    (still one line and exit 4 for the user).
    """
    path = Path(path)
    try:
        with open_regular(path, what="a model file") as fh:
            head = fh.read(64)
        if head.startswith(b"PK\x03\x04"):
            return _load_zip(path)
        if _legacy_head(head):
            return _load_legacy(path)
        raise InputError(path, "neither a torch.save zip archive nor a legacy PyTorch file")
    except AuditorError:
        raise
    except OSError as exc:
        raise InputError(path, f"cannot be read: {exc.strerror or exc}") from None
    except MemoryError:
        raise InputError(path, "declares more data than can be held in memory") from None
    except Exception as exc:  # a loader bug: still one line naming the file, and a failure for the fuzz tests
        raise LoaderBugError(path, f"could not be read as a PyTorch checkpoint ({short_error(exc)})") from exc


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
