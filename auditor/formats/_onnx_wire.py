"""A strict walk of an ONNX file's protobuf wire format, run before the protobuf runtime parses it.

The runtime spends about 500 bytes of memory and a few microseconds on every
message it builds, and a message can cost as little as two bytes of file
(``0a 00``: an empty ``NodeProto``): a 10 MB file of five million empty nodes
took 41 s and 2.6 GB to parse. This walk reads tags and lengths only, knows
from the ONNX schema (the ``onnx`` package's own descriptors) which fields are
messages and which are repeated strings, and counts what the runtime would
build, without building it. Length-delimited fields that are neither (raw
tensor data, packed numbers, text) are skipped by their length, so a
gigabyte of weights costs nothing. It refuses:

* more than :data:`MAX_ENTRIES` messages and repeated strings (nodes,
  attributes, tensors, value infos, shape dimensions, node input and output
  names...), the budget that keeps a parse under about 1 GB;
* more than :data:`MAX_FIELDS` fields in all (every tag read, unknown fields
  included), which bounds the walk's own time;
* more than :data:`MAX_PACKED_VALUES` numbers in packed varint fields
  (``int64_data``, ``int32_data``, ``dims``...): one byte of file can be one
  value, which the runtime keeps in 4 or 8 bytes, so these are counted from
  their bytes (one value ends at each byte below 0x80) rather than skipped;
* messages nested more than :data:`MAX_DEPTH` deep (protobuf's own limit:
  subgraphs of subgraphs cost three levels each);
* malformed wire data: a varint over ten bytes, a length past the end of its
  message, wire types ONNX never uses (groups) or field number 0.

The walk is iterative, so no nesting reaches Python's recursion limit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_DEPTH", "MAX_ENTRIES", "MAX_FIELDS", "MAX_PACKED_VALUES", "BudgetExceeded", "Counts", "WireError", "schema",
    "walk",
]  # fmt: skip

#: Most protobuf messages and repeated strings in one ONNX file. Real models hold far fewer: a
#: transformer exported to ONNX has 10^4 to 10^5 nodes, about five to ten entries each (the node, its
#: attributes, its input and output names); at about 500 bytes each in the protobuf runtime, and as
#: much again in auditor's own tables, a million keeps the parse near 1 GB.
MAX_ENTRIES = 1_000_000
#: Most fields (tags) in one file, unknown ones included: bounds the walk itself to a few seconds.
MAX_FIELDS = 10_000_000
#: Deepest nesting of messages (the protobuf runtime's default recursion limit).
MAX_DEPTH = 100
#: Most numbers in packed varint fields in one file: the runtime keeps each in up to 8 bytes, so this keeps
#: them under 1 GiB. Weights are stored as raw bytes (``raw_data``) by every exporter auditor knows; a tensor
#: of this many elements in ``int64_data`` would need that memory in any reader.
MAX_PACKED_VALUES = 128 << 20

_MESSAGE, _STRINGS, _PACKED = 1, 2, 3
_HIGH_BYTES = bytes(range(0x80, 0x100))
# A message type's fields that cost the runtime an object: number -> (kind, child table, shown name).
Table = dict[int, tuple[int, "Table", str]]
_EMPTY: Table = {}


class WireError(ValueError):
    """The bytes are not a well-formed protobuf (the message says where and why)."""


class BudgetExceeded(ValueError):
    """The file holds more than a budget allows (the message names the budget)."""


@dataclass(frozen=True)
class Counts:
    """What the walk saw: messages and repeated strings, all fields, the deepest nesting."""

    entries: int
    fields: int
    depth: int


@functools.cache
def schema(descriptor: Any) -> Table:
    """The walk's table for a protobuf message ``descriptor`` (``onnx.ModelProto.DESCRIPTOR``), built once
    per message type so that recursive types (``TypeProto``, ``GraphProto`` through ``AttributeProto``) close."""
    from google.protobuf.descriptor import FieldDescriptor

    texts = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
    varints = (
        FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM,
    )  # fmt: skip
    built: dict[str, Table] = {}
    todo = [descriptor]
    while todo:
        d = todo.pop()
        table = built.setdefault(d.full_name, {})
        for fd in d.fields:
            name = f"{d.name}.{fd.name}"
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                child = fd.message_type
                if child.full_name not in built:
                    built[child.full_name] = {}
                    todo.append(child)
                table[fd.number] = (_MESSAGE, built[child.full_name], name)
            elif fd.type in texts and _repeated(fd):
                table[fd.number] = (_STRINGS, _EMPTY, name)
            elif fd.type in varints and _repeated(fd):
                table[fd.number] = (_PACKED, _EMPTY, name)
    return built[descriptor.full_name]


def _repeated(fd: Any) -> bool:
    repeated = getattr(fd, "is_repeated", None)  # protobuf >= 5.28; ``label`` is deprecated there
    if repeated is not None:
        return bool(repeated)
    return bool(fd.label == fd.LABEL_REPEATED)


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """``(value, next position)`` of the varint at ``pos``, which must end before ``end``."""
    value = shift = 0
    start = pos
    while pos < end:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise WireError(f"the varint at byte {start} runs over 10 bytes")
    raise WireError(f"the varint at byte {start} runs past the end of its message (byte {end})")


def walk(
    data: bytes,
    top: Table,
    *,
    max_entries: int = MAX_ENTRIES,
    max_fields: int = MAX_FIELDS,
    max_depth: int = MAX_DEPTH,
    max_packed: int = MAX_PACKED_VALUES,
) -> Counts:
    """Walk ``data`` as a message of table ``top``; raise :class:`WireError` or :class:`BudgetExceeded`.

    Messages are counted when entered, so a budget is refused as soon as it is passed, having read no
    more than that many entries.
    """
    stack: list[tuple[int, Table, str]] = []
    pos, end, table, inside = 0, len(data), top, ""
    entries = fields = deepest = packed = 0
    while True:
        if pos >= end:
            if not stack:
                return Counts(entries, fields, deepest)
            end, table, inside = stack.pop()
            continue
        start = pos
        tag = data[pos]
        pos += 1
        if tag >= 0x80:
            tag, pos = _varint(data, start, end)
        fields += 1
        if fields > max_fields:
            raise BudgetExceeded(f"more than {max_fields:,d} protobuf fields")
        wire, number = tag & 7, tag >> 3
        if number == 0:
            raise WireError(f"byte {start} starts a field numbered 0")
        if wire == 0:
            if pos < end and data[pos] < 0x80:
                pos += 1
            else:
                _, pos = _varint(data, pos, end)
        elif wire == 2:
            length = data[pos] if pos < end else 0x80
            if length < 0x80:
                pos += 1
            else:
                length, pos = _varint(data, pos, end)
            if pos + length > end:
                entry = table.get(number)
                name = entry[2] if entry else f"number {number}"
                if not stack:
                    name = name.removeprefix("ModelProto.")
                    raise WireError(
                        f"truncated: field {name} at byte {start} needs {length} bytes, the file ends {end - pos} later"
                    )
                raise WireError(
                    f"field {name} at byte {start} needs {length} bytes, the enclosing {inside} ends {end - pos} later"
                )
            entry = table.get(number)
            if entry is None:
                pos += length
                continue
            if entry[0] == _PACKED:  # one value ends at each byte below 0x80
                packed += len(data[pos : pos + length].translate(None, _HIGH_BYTES))
                if packed > max_packed:
                    raise BudgetExceeded(
                        f"more than {max_packed:,d} numbers in packed integer fields ({entry[2]} at byte {start})"
                    )
                pos += length
                continue
            entries += 1
            if entries > max_entries:
                raise BudgetExceeded(
                    f"more than {max_entries:,d} protobuf messages and repeated names "
                    "(nodes, attributes, tensors, shapes, input and output names...)"
                )
            if entry[0] == _MESSAGE:
                if len(stack) >= max_depth:
                    raise WireError(f"messages nested more than {max_depth} deep (at byte {start}, {entry[2]})")
                stack.append((end, table, inside))
                deepest = max(deepest, len(stack))
                end, table, inside = pos + length, entry[1], entry[2]
            else:
                pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise WireError(f"the fixed-size field at byte {start} runs past the end of its message (byte {end})")
        else:
            raise WireError(f"byte {start} starts a field of wire type {wire}, which ONNX never uses")
