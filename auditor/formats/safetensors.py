"""safetensors: a single file, or a folder of shards with ``*.safetensors.index.json``.

The header is parsed here rather than by the safetensors library, so that
every inconsistency becomes an error naming the tensor and offset; tensors
are memory-mapped copy-on-write and read only when asked for.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from auditor.bases import Format
from auditor.errors import InputError
from auditor.formats._io import inside_folder, mmap_tensor, read_exact
from auditor.formats.statedict import graph_from_tensors, split_key
from auditor.graph import LayerGraph, TensorRef, itemsize
from auditor.hookspecs import hookimpl
from auditor.jsondata import DuplicateKeyError, unique_keys
from auditor.safeio import open_regular, read_small_file

__all__ = ["MAX_HEADER", "MAX_ITEMS", "MAX_TENSORS", "SafetensorsFormat", "load", "read_header", "sniff"]

#: The safetensors library's own limit on the JSON header.
MAX_HEADER = 100_000_000
#: Most tensor entries in one header, counted from its bytes before the JSON is parsed (every entry is a
#: JSON object). Real checkpoints hold a few thousand per file; each entry costs about 1.3 KB and 20 us
#: between parsing and the layer graph, so this keeps a hostile header near 0.7 GB and 10 s.
MAX_TENSORS = 500_000
#: Most items (list elements and object members) in one header, counted as its commas before parsing:
#: a real entry has four to eight (about 300,000 entries of 4-D tensors fit), and a header of 100 MB of
#: ``"k":"",`` would otherwise build 8 million metadata strings (20 s and 2.5 GB).
MAX_ITEMS = 2_000_000
#: Largest index file accepted.
MAX_INDEX = 50_000_000
#: Most dimensions a tensor may have (a longer shape list is a hostile header, not a model).
MAX_DIMS = 64

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
# safetensors writers sort tensors by dtype and name, so the model's own module order is lost.
_ORDER = "natural order of their names (safetensors records no module order, so inferred edges may be wrong)"

# Hostile headers hold megabyte-long names and deeply nested values: messages show a bounded excerpt.
_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80
_short.maxlist = 8
_short.maxdict = 4
_short.maxlevel = 3


def _show(value: Any) -> str:
    return _short.repr(value)


def natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key that orders ``layer2`` before ``layer10`` and ``0.weight`` before ``1.weight``.

    Digit runs compare by value (length without leading zeros, then digits), so
    a name with thousands of digits or non-ASCII digits sorts without error.
    """
    key = []
    for part in re.split(r"(\d+)", name):
        if not part:
            continue
        if part.isdecimal():
            digits = part.lstrip("0") or "0"
            key.append((0, len(digits), digits))
        else:
            key.append((1, 0, part))
    return tuple(key)


def _sort_key(item: tuple[str, TensorRef]) -> tuple[tuple[tuple[int, int, str], ...], str]:
    # By module first, so that ``layer2.weight`` comes before ``layer2.sub9.weight``.
    return natural_key(split_key(item[0])[0]), item[0]


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


def _parse_json(raw: bytes, *, path: Path, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKeyError as exc:
        raise InputError(path, f"{what} names the key {_show(exc.key)} twice") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise InputError(path, f"{what} is not valid JSON ({type(exc).__name__})") from None


def _check_budget(path: Path, raw: bytes) -> None:
    """Refuse a header that would cost more than the budgets to parse, from a count of its bytes (braces
    and commas inside strings count too: the count can only overestimate)."""
    objects = raw.count(b"{") - 1  # besides the header itself
    if objects > MAX_TENSORS:
        raise InputError(
            path,
            f"the header holds {objects:,d} JSON objects, more than the {MAX_TENSORS:,d} tensor entries "
            "auditor's budget allows in one safetensors file (real checkpoints hold a few thousand); refused "
            "before parsing",
        )
    items = raw.count(b",") + 1
    if items > MAX_ITEMS:
        raise InputError(
            path,
            f"the header holds about {items:,d} JSON items, more than the {MAX_ITEMS:,d} auditor's budget allows "
            "in one safetensors file (a tensor entry has four to eight); refused before parsing",
        )


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """``(tensors, metadata, data_start)`` of one safetensors file, checked against its size."""
    size = path.stat().st_size
    with open_regular(path, what="a model file") as fh:
        (n,) = struct.unpack("<Q", read_exact(fh, 8, path=path, what="the header length"))
        if n > MAX_HEADER:
            raise InputError(path, f"header claims {n} bytes, more than the {MAX_HEADER}-byte limit")
        if 8 + n > size:
            raise InputError(path, f"truncated: header claims {n} bytes but the file holds {size - 8} after its length")
        raw = read_exact(fh, n, path=path, what="the header")
    _check_budget(path, raw)
    header = _parse_json(raw, path=path, what="the header")
    if not isinstance(header, dict):
        raise InputError(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(path, "__metadata__ must map strings to strings")
    return header, metadata, 8 + n


def _check_entry(path: Path, name: str, info: Any, data_len: int) -> tuple[list[int], list[int]]:
    """The entry's ``(shape, data_offsets)`` once both are well-formed and inside the data."""
    if not isinstance(info, dict):
        raise InputError(path, f"tensor {_show(name)}: entry is not an object")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        raise InputError(path, f"tensor {_show(name)}: shape {_show(shape)} is not a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise InputError(path, f"tensor {_show(name)}: shape has {len(shape)} dimensions, more than {MAX_DIMS}")
    # Only an empty tensor can pass the size check with huge dimensions; torch cannot hold them.
    if math.prod(max(s, 1) for s in shape) >= 2**62:
        raise InputError(path, f"tensor {_show(name)}: shape {_show(shape)} is too large to address")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise InputError(path, f"tensor {_show(name)}: data_offsets {_show(offsets)} are not [begin, end]")
    if offsets[1] > data_len:
        raise InputError(
            path,
            f"truncated: tensor {_show(name)} ends at data offset {_show(offsets[1])}, the file holds {data_len} data"
            " bytes",
        )
    return shape, offsets


def _coverage_notes(path: Path, spans: list[tuple[int, int, str]], data_len: int) -> list[str]:
    """Notes on data bytes no tensor claims and on tensors sharing bytes (the format allows neither)."""
    notes: list[str] = []
    pos, last, hidden, overlaps = 0, "", 0, 0
    first_overlap = ""
    for begin, end, name in sorted(spans):
        if begin == end:
            continue
        if begin > pos:
            hidden += begin - pos
        elif begin < pos:
            overlaps += 1
            first_overlap = first_overlap or f"{_show(last)} and {_show(name)}"
        if end > pos:
            pos, last = end, name
    hidden += data_len - pos
    if hidden:
        notes.append(f"{path.name}: {hidden} data bytes belong to no tensor (a valid file has none)")
    if overlaps:
        notes.append(f"{path.name}: {overlaps} tensors share bytes with another tensor (first: {first_overlap})")
    return notes


def _tensor_refs(
    path: Path, origin: Path, notes: list[str]
) -> tuple[list[tuple[str, TensorRef]], dict[str, str], set[str]]:
    """The file's readable tensors in header order, its metadata and the names skipped for their dtype."""
    header, metadata, start = read_header(path)
    data_len = path.stat().st_size - start
    refs: list[tuple[str, TensorRef]] = []
    skipped: set[str] = set()
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        shape, offsets = _check_entry(path, name, info, data_len)
        spans.append((offsets[0], offsets[1], name))
        dtype_code = info.get("dtype")
        if not isinstance(dtype_code, str) or dtype_code not in _DTYPES:
            notes.append(
                f"{path.name}: tensor {_show(name)} has dtype {_show(dtype_code)}, which auditor does not read; skipped"
            )
            skipped.add(name)
            continue
        dtype = _DTYPES[dtype_code]
        nbytes = math.prod(shape) * itemsize(dtype)
        if offsets[1] - offsets[0] != nbytes:
            raise InputError(
                path,
                f"tensor {_show(name)}: shape {shape} of {dtype_code} needs {nbytes} bytes, "
                f"offsets span {offsets[1] - offsets[0]}",
            )
        shape_t = tuple(shape)

        def reader(
            p: Path = path, off: int = start + offsets[0], s: tuple[int, ...] = shape_t, d: str = dtype, n: str = name
        ) -> Any:
            return mmap_tensor(p, off, s, d, name=n, origin=origin)

        refs.append((name, TensorRef(name, shape_t, dtype, reader)))
    notes.extend(_coverage_notes(path, spans, data_len))
    return refs, metadata, skipped


def _load_sharded(folder: Path, index: Path) -> LayerGraph:
    index = inside_folder(folder, index.name, what="index", origin=folder)
    if index.stat().st_size > MAX_INDEX:
        raise InputError(index, f"index file larger than {MAX_INDEX} bytes")
    raw = read_small_file(index, limit=MAX_INDEX, what="a safetensors index")
    data = _parse_json(raw, path=index, what="the index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(index, "has no weight_map of tensor names to shard files")
    notes: list[str] = []
    shards: dict[str, dict[str, TensorRef]] = {}
    skipped: dict[str, set[str]] = {}
    files = [index]
    metadata: dict[str, Any] = {"shards": []}
    for shard_name in dict.fromkeys(weight_map.values()):
        shard = inside_folder(folder, shard_name, what="shard", origin=index)
        refs, meta, skipped[shard_name] = _tensor_refs(shard, shard, notes)
        shards[shard_name] = dict(refs)
        files.append(shard)
        metadata["shards"].append(shard_name)
        metadata.update({f"{shard_name}:{k}": v for k, v in meta.items()})
    ordered: list[tuple[str, TensorRef]] = []
    for name, shard_name in weight_map.items():
        ref = shards[shard_name].get(name)
        if ref is None:
            if name in skipped[shard_name]:
                continue
            raise InputError(index, f"tensor {_show(name)} is mapped to {_show(shard_name)}, which does not hold it")
        ordered.append((name, ref))
    for shard_name, held in shards.items():
        unlisted = sorted(name for name in held if weight_map.get(name) != shard_name)
        if unlisted:
            notes.append(
                f"{shard_name}: holds {len(unlisted)} tensors the index does not map to it, not loaded "
                f"(first: {_show(unlisted[0])})"
            )
    ordered.sort(key=_sort_key)
    return graph_from_tensors("safetensors", folder, ordered, files=files, metadata=metadata, notes=notes, order=_ORDER)


def load(path: Path) -> LayerGraph:
    """Read a safetensors file or sharded folder into a layer graph (weights stay mapped)."""
    if path.is_dir():
        index = _index_file(path)
        if index is not None:
            return _load_sharded(path, index)
        path = inside_folder(path, "model.safetensors", what="file", origin=path)
    notes: list[str] = []
    refs, metadata, _ = _tensor_refs(path, path, notes)
    refs.sort(key=_sort_key)
    return graph_from_tensors(
        "safetensors", path, refs, files=[path], metadata=dict(metadata), notes=notes, order=_ORDER
    )


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
def register_formats(register: Callable[[Format], None]) -> None:
    """Register the safetensors format."""
    register(SafetensorsFormat())
