"""safetensors: a single file, or a folder of shards with ``*.safetensors.index.json``.

The header is parsed here rather than by the safetensors library, so that
every inconsistency becomes an error naming the tensor and offset; tensors
are memory-mapped copy-on-write and read only when asked for.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

from auditor.bases import Format
from auditor.errors import InputError
from auditor.formats._io import NUMPY_DTYPES, inside_folder, mmap_tensor, read_exact
from auditor.formats._statedict import graph_from_tensors
from auditor.graph import LayerGraph, TensorRef
from auditor.hookspecs import hookimpl

__all__ = ["MAX_HEADER", "SafetensorsFormat", "load", "read_header", "sniff"]

#: The safetensors library's own limit on the JSON header.
MAX_HEADER = 100_000_000
#: Largest index file accepted.
MAX_INDEX = 50_000_000

_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_INDEX_NAMES = ("model.safetensors.index.json",)
_ORDER_NOTE = (
    "safetensors stores no module order (writers sort tensors by dtype and name): "
    "layers are in natural order of their names"
)


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``layer2`` before ``layer10`` and ``0.weight`` before ``1.weight``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)


def _index_file(folder: Path) -> Path | None:
    for name in _INDEX_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors.index.json"))
    return found[0] if len(found) == 1 else None


def sniff(path: Path, head: bytes) -> bool:
    """A file whose first 8 bytes are a little-endian header length followed by ``{``,
    or a folder with a safetensors index or a single ``model.safetensors``."""
    if path.is_dir():
        return _index_file(path) is not None or (path / "model.safetensors").is_file()
    if len(head) < 10:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= MAX_HEADER and head[8:9] == b"{"


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """``(tensors, metadata, data_start)`` of one safetensors file, checked against its size."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", read_exact(fh, 8, path=path, what="the header length"))
        if n > MAX_HEADER:
            raise InputError(path, f"header claims {n} bytes, more than the {MAX_HEADER}-byte limit")
        if 8 + n > size:
            raise InputError(path, f"truncated: header claims {n} bytes but the file holds {size - 8} after its length")
        raw = read_exact(fh, n, path=path, what="the header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(path, f"the header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise InputError(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(path, "__metadata__ must map strings to strings")
    return header, metadata, 8 + n


def _tensor_refs(path: Path, origin: Path, notes: list[str]) -> tuple[list[tuple[str, TensorRef]], dict[str, str]]:
    header, metadata, start = read_header(path)
    data_len = path.stat().st_size - start
    refs: list[tuple[str, TensorRef]] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise InputError(path, f"tensor {name!r}: entry is not an object")
        dtype_code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise InputError(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise InputError(path, f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
        if dtype_code not in _DTYPES:
            notes.append(f"{path.name}: tensor {name!r} has dtype {dtype_code!r}, which auditor does not read; skipped")
            continue
        dtype = _DTYPES[str(dtype_code)]
        nbytes = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise InputError(
                path, f"tensor {name!r}: shape {shape} of {dtype_code} needs {nbytes} bytes, offsets span {offsets[1] - offsets[0]}"
            )
        if offsets[1] > data_len:
            raise InputError(
                path, f"truncated: tensor {name!r} ends at data offset {offsets[1]}, the file holds {data_len} data bytes"
            )
        shape_t = tuple(shape)

        def reader(p: Path = path, off: int = start + offsets[0], s: tuple[int, ...] = shape_t,
                   d: str = dtype, n: str = name) -> Any:
            return mmap_tensor(p, off, s, d, name=n, origin=origin)

        refs.append((name, TensorRef(name, shape_t, dtype, reader)))
    return refs, metadata


def _load_sharded(folder: Path, index: Path) -> LayerGraph:
    if index.stat().st_size > MAX_INDEX:
        raise InputError(index, f"index file larger than {MAX_INDEX} bytes")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(index, f"not valid JSON ({type(exc).__name__})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(index, "has no weight_map of tensor names to shard files")
    notes: list[str] = []
    shards: dict[str, dict[str, TensorRef]] = {}
    files = [index]
    metadata: dict[str, Any] = {"shards": []}
    for shard_name in dict.fromkeys(weight_map.values()):
        shard = inside_folder(folder, shard_name, what=f"shard {shard_name!r}", origin=index)
        refs, meta = _tensor_refs(shard, shard, notes)
        shards[shard_name] = dict(refs)
        files.append(shard)
        metadata["shards"].append(shard_name)
        metadata.update({f"{shard_name}:{k}": v for k, v in meta.items()})
    ordered: list[tuple[str, TensorRef]] = []
    for name, shard_name in weight_map.items():
        ref = shards[shard_name].get(name)
        if ref is None:
            raise InputError(index, f"tensor {name!r} is mapped to {shard_name!r}, which does not hold it")
        ordered.append((name, ref))
    ordered.sort(key=lambda item: natural_key(item[0]))
    notes.append(_ORDER_NOTE)
    return graph_from_tensors("safetensors", folder, ordered, files=files, metadata=metadata, notes=notes)


def load(path: Path) -> LayerGraph:
    """Read a safetensors file or sharded folder into a layer graph (weights stay mapped)."""
    if path.is_dir():
        index = _index_file(path)
        if index is not None:
            return _load_sharded(path, index)
        path = inside_folder(path, "model.safetensors", what="model.safetensors", origin=path)
    notes: list[str] = []
    refs, metadata = _tensor_refs(path, path, notes)
    refs.sort(key=lambda item: natural_key(item[0]))
    notes.append(_ORDER_NOTE)
    return graph_from_tensors("safetensors", path, refs, files=[path], metadata=dict(metadata), notes=notes)


class SafetensorsFormat(Format):
    """safetensors files and sharded folders."""

    id = "safetensors"
    description = "safetensors file, or a folder of shards with model.safetensors.index.json (memory-mapped)"
    priority = 30

    def sniff(self, path: Path, head: bytes) -> bool:
        return sniff(path, head)

    def load(self, path: Path) -> LayerGraph:
        return load(path)


@hookimpl
def register_formats(register) -> None:  # type: ignore[no-untyped-def]
    """Register the safetensors format."""
    register(SafetensorsFormat())
