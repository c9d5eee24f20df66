"""GGUF (llama.cpp, Ollama, LM Studio): the header parsed here, tensors read and dequantised on demand.

Nothing in a GGUF file is executed or rendered: its chat template is Jinja and
stays a string whose length is recorded. The header is read by this module,
not by the ``gguf`` package, with every count, length, offset and alignment
checked against what is left of the file *before* anything is allocated (a
crafted 43-byte file that claims an array of 2**63 elements is refused at once).

What the layer graph gets:

* tensor shapes in PyTorch's order (GGUF lists dimensions fastest-first);
* for Llama-family architectures, the original checkpoint's names
  (``blk.3.attn_q`` -> ``model.layers.3.self_attn.q_proj``) and, where
  llama.cpp's converter reordered the query and key rows for its rotary
  kernel, the original row order restored; the graph's notes say which steps
  were undone;
* weights read lazily: F32, F16 and BF16 memory-mapped, the block-quantised
  types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) dequantised to float32
  when a detector reads them; the layer's ``quantized`` attribute records the
  GGML type.
"""

from __future__ import annotations

import itertools
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from auditor.bases import Format
from auditor.errors import InputError
from auditor.formats._gguf_quants import BLOCK_TYPES, FLOAT_TYPES, GGML_TYPES, KNOWN_UNREAD, dequantize, row_bytes
from auditor.formats._io import mmap_tensor
from auditor.formats.statedict import graph_from_tensors
from auditor.graph import LayerGraph, LayerKind, TensorRef
from auditor.hookspecs import hookimpl
from auditor.safeio import open_regular

__all__ = [
    "MAX_ARRAY_ITEMS",
    "MAX_KV",
    "MAX_TENSORS",
    "GGUFFormat",
    "GGUFHeader",
    "load",
    "read_header",
    "sniff",
]

MAGIC = b"GGUF"
#: Most metadata key-value pairs (real files hold 20 to 60).
MAX_KV = 65_536
#: Most tensors (a 7B Llama holds 291, the largest mixture-of-experts files a few tens of thousands).
MAX_TENSORS = 1_000_000
#: Most strings (and nested arrays) in the header's arrays, which are walked one by one: a 262k-token
#: vocabulary with 150k merges is about 0.4 million. Numeric arrays are skipped by their byte count and
#: need no budget beyond the file's size; every length is also checked against the bytes left.
MAX_ARRAY_ITEMS = 4_000_000
#: Longest key, tensor name and metadata string.
MAX_KEY = 65_536
MAX_NAME = 65_536
MAX_STRING = 64 * 1024 * 1024
#: Most dimensions of a tensor (ggml has 4) and most nesting of arrays in arrays.
MAX_DIMS = 8
MAX_DEPTH = 8
#: Largest data alignment accepted (the default is 32).
MAX_ALIGNMENT = 1 << 20
#: Strings longer than this are recorded by length only; arrays longer than this by type and length only.
_KEEP_STRING = 1024
_KEEP_ARRAY = 64

# GGUF value types: code -> (struct format, size); 8 is string, 9 is array.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
    7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}  # fmt: skip
_TYPE_NAMES = {
    0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
    8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_WINDOW = 1 << 20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header declares it (``shape`` in PyTorch's order, ``offset`` from the data start)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int | None  # None for a type this version does not read

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.ggml_type) or KNOWN_UNREAD.get(self.ggml_type) or f"type {self.ggml_type}"


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF header declares: version, metadata (bounded: see :func:`read_header`), tensors, data start."""

    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    alignment: int
    data_start: int


class _Cursor:
    """Reads a file front to back, refusing any length that is more than what is left of it."""

    def __init__(self, fh: BinaryIO, size: int, path: Path) -> None:
        self.fh, self.size, self.path, self.pos = fh, size, path, 0
        self.items = 0

    def fail(self, message: str) -> InputError:
        return InputError(self.path, f"GGUF header at byte {self.pos}: {message}")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes but only {self.size - self.pos} are left (truncated or corrupt)")
        data = self.fh.read(n)
        if len(data) != n:
            raise self.fail(f"{what}: the file ended early")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes but only {self.size - self.pos} are left (truncated or corrupt)")
        self.fh.seek(n, 1)
        self.pos += n

    def skip_strings(self, count: int, what: str) -> None:
        """Walk past ``count`` length-prefixed strings without decoding them, a window of bytes at a time."""
        window, at, left = b"", 0, count
        while left:
            if len(window) - at < 8:
                window = window[at:] + self.fh.read(min(_WINDOW, self.size - self.pos - (len(window) - at)))
                at = 0
                if len(window) < 8:
                    raise self.fail(f"{what}: the strings run past the end of the file (truncated or corrupt)")
            (n,) = _U64.unpack_from(window, at)
            if n > MAX_STRING or n > self.size - self.pos - 8:
                raise self.fail(f"{what}: a string of {n} bytes runs past the end of the file (truncated or corrupt)")
            self.pos += 8 + n
            at += 8 + n
            left -= 1
            if at > len(window):  # the string ran past the window: continue after it
                self.fh.seek(self.pos)
                window, at = b"", 0
        if at < len(window):  # give back what was read ahead
            self.fh.seek(self.pos)

    def unpack(self, fmt: str, size: int, what: str) -> Any:
        return struct.unpack(fmt, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", 8, what))

    def string(self, limit: int, what: str, *, keep: int | None = None) -> str | int:
        """A length-prefixed UTF-8 string; only its length when it is longer than ``keep`` bytes."""
        n = self.u64(f"{what} length")
        if n > limit:
            raise self.fail(f"{what} is {n} bytes long, more than the {limit} accepted")
        if keep is not None and n > keep:
            self.skip(n, what)
            return n
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _value(cur: _Cursor, vtype: int, key: str, depth: int) -> Any:
    """One metadata value: scalars and short strings as they are, long strings and arrays summarised."""
    if vtype in _SCALARS:
        fmt, size = _SCALARS[vtype]
        value = cur.unpack(fmt, size, f"value of {key!r}")
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value
    if vtype == _STRING:
        text = cur.string(MAX_STRING, f"string value of {key!r}", keep=_KEEP_STRING)
        return {"type": "string", "length": text} if isinstance(text, int) else text
    if vtype == _ARRAY:
        if depth >= MAX_DEPTH:
            raise cur.fail(f"{key!r}: arrays nested more than {MAX_DEPTH} deep")
        etype = cur.u32(f"element type of {key!r}")
        count = cur.u64(f"length of {key!r}")
        if etype not in _SCALARS and etype not in (_STRING, _ARRAY):
            raise cur.fail(f"{key!r}: unknown element type {etype}")
        least = _SCALARS[etype][1] if etype in _SCALARS else (8 if etype == _STRING else 12)
        if count > (cur.size - cur.pos) // least:
            raise cur.fail(
                f"{key!r} claims {count} elements of {_TYPE_NAMES[etype]}, more than the "
                f"{cur.size - cur.pos} bytes left can hold (truncated or hostile)"
            )
        if etype in (_STRING, _ARRAY):  # numbers are skipped by their byte count; strings one by one
            cur.items += count
            if cur.items > MAX_ARRAY_ITEMS:
                raise cur.fail(f"more than {MAX_ARRAY_ITEMS} strings and arrays in the header's arrays")
        if etype in _SCALARS:
            fmt, size = _SCALARS[etype]
            if count <= _KEEP_ARRAY:
                raw = cur.take(count * size, f"elements of {key!r}")
                return [_finite(v) for v in struct.iter_unpack(fmt, raw)]
            cur.skip(count * size, f"elements of {key!r}")
            return {"type": f"array of {_TYPE_NAMES[etype]}", "length": count}
        if etype == _STRING and count > _KEEP_ARRAY:
            cur.skip_strings(count, key)
            return {"type": "array of string", "length": count}
        kept = []
        for i in range(count):
            item = _value(cur, etype, f"{key}[{i}]", depth + 1) if etype == _ARRAY else None
            if etype == _STRING:
                item = cur.string(MAX_STRING, f"{key}[{i}]", keep=_KEEP_STRING if count <= _KEEP_ARRAY else -1)
            if count <= _KEEP_ARRAY:
                kept.append(item)
        return kept if count <= _KEEP_ARRAY else {"type": f"array of {_TYPE_NAMES[etype]}", "length": count}
    raise cur.fail(f"{key!r} has unknown value type {vtype}")


def _finite(values: tuple[Any, ...]) -> Any:
    value = values[0]
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _tensor_info(cur: _Cursor, i: int) -> TensorInfo:
    name = cur.string(MAX_NAME, f"name of tensor {i}")
    assert isinstance(name, str)
    n_dims = cur.u32(f"dimension count of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} accepted)")
    dims = [cur.u64(f"dimension of {name!r}") for _ in range(n_dims)]
    if any(d < 1 or d > 1 << 40 for d in dims):
        raise cur.fail(f"tensor {name!r} has dimensions {dims}: each must be 1 to 2**40")
    ggml_type = cur.u32(f"type of {name!r}")
    offset = cur.u64(f"offset of {name!r}")
    shape = tuple(reversed(dims))  # GGUF lists the fastest-varying dimension first
    numel = math.prod(dims)
    nbytes: int | None = None
    type_name = GGML_TYPES.get(ggml_type)
    if type_name is not None:
        per_row = row_bytes(type_name, dims[0])
        if per_row is None:
            block = BLOCK_TYPES[type_name][0]
            raise cur.fail(f"tensor {name!r}: rows of {dims[0]} weights are not whole blocks of {block} ({type_name})")
        nbytes = per_row * (numel // dims[0])
    return TensorInfo(name, shape, ggml_type, offset, nbytes)


def read_header(path: Path) -> GGUFHeader:
    """Parse and check a GGUF header; raises :class:`InputError` on anything inconsistent or over budget."""
    with open_regular(path, what="a model file") as fh:
        size = fh.seek(0, 2)
        fh.seek(0)
        cur = _Cursor(fh, size, path)
        if cur.take(4, "magic") != MAGIC:
            raise cur.fail("not a GGUF file (no GGUF magic)")
        version = cur.u32("version")
        if version in (2, 3):
            pass
        elif version & 0xFFFF == 0 and version >> 16 in (2, 3):
            raise cur.fail("big-endian GGUF files are not read (version is byte-swapped)")
        else:
            raise cur.fail(f"GGUF version {version} is not read (2 and 3 are)")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        if n_tensors > MAX_TENSORS:
            raise cur.fail(f"{n_tensors} tensors declared, more than the {MAX_TENSORS} accepted")
        if n_kv > MAX_KV:
            raise cur.fail(f"{n_kv} metadata entries declared, more than the {MAX_KV} accepted")
        # Every entry takes at least 12 bytes (an empty key and a type) and every tensor 32: a count the file
        # cannot hold is refused before the loop.
        if n_kv * 12 + n_tensors * 32 > size - cur.pos:
            raise cur.fail(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in a {size}-byte file")
        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(MAX_KEY, f"key of metadata entry {i}")
            assert isinstance(key, str)
            if key in metadata:
                raise cur.fail(f"metadata key {key!r} appears twice")
            vtype = cur.u32(f"type of {key!r}")
            metadata[key] = _value(cur, vtype, key, 0)
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or not 1 <= alignment <= MAX_ALIGNMENT:
            raise cur.fail(f"general.alignment {alignment!r} is not 1 to {MAX_ALIGNMENT}")
        if alignment & (alignment - 1):
            raise cur.fail(f"general.alignment {alignment} is not a power of two")
        tensors = [_tensor_info(cur, i) for i in range(n_tensors)]
        data_start = -(-cur.pos // alignment) * alignment
    _check_tensors(path, tensors, alignment, data_start, size)
    return GGUFHeader(version, metadata, tensors, alignment, data_start)


def _check_tensors(path: Path, tensors: list[TensorInfo], alignment: int, data_start: int, size: int) -> None:
    seen: set[str] = set()
    spans = []
    for t in tensors:
        if t.name in seen:
            raise InputError(path, f"GGUF tensor {t.name!r} appears twice")
        seen.add(t.name)
        if t.offset % alignment:
            raise InputError(path, f"GGUF tensor {t.name!r}: offset {t.offset} is not a multiple of {alignment}")
        if t.nbytes is None:
            continue
        end = data_start + t.offset + t.nbytes
        if end > size:
            raise InputError(
                path,
                f"GGUF tensor {t.name!r} ({t.type_name}, shape {list(t.shape)}) needs bytes "
                f"{data_start + t.offset}..{end} but the file holds only {size} (truncated?)",
            )
        spans.append((t.offset, t.offset + t.nbytes, t.name))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise InputError(path, f"GGUF tensors {a!r} and {b!r} share bytes")


def sniff(path: Path, head: bytes) -> bool:
    """A GGUF file starts with the magic ``GGUF``."""
    return head[:4] == MAGIC


# -- names and llama.cpp's conversion steps ------------------------------------------------------------------

#: Architectures whose GGUF names map onto the Hugging Face Llama layout.
_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "internlm2", "granite", "olmo", "olmo2", "exaone"}
#: Architectures whose query/key rows llama.cpp's converter reorders for its rotary kernel (``LlamaModel``).
_ROPE_REORDERED = {"llama", "mistral", "granite"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_TOP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_PER_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(name: str) -> str | None:
    """The Hugging Face name of a Llama-family GGUF tensor, or ``None`` when it has none here."""
    module, dot, role = name.rpartition(".")
    if not dot:
        return None
    if module in _TOP:
        return f"{_TOP[module]}.{role}"
    m = _BLOCK.match(module)
    if m and m.group(2) in _PER_BLOCK:
        return f"model.layers.{m.group(1)}.{_PER_BLOCK[m.group(2)]}.{role}"
    return None


def _kind(gguf_name: str, shape: tuple[int, ...]) -> LayerKind:
    module = gguf_name.rpartition(".")[0]
    last = module.rsplit(".", 1)[-1]
    if last in ("token_embd", "position_embd", "token_types"):
        return LayerKind.EMBEDDING
    if len(shape) == 1 and ("norm" in last):
        return LayerKind.LAYER_NORM
    if len(shape) == 2:
        return LayerKind.LINEAR
    return LayerKind.OTHER


def _unpermute(heads: int) -> Callable[[Any], Any]:
    """Inverse of llama.cpp's rotary row order (rows of each head: pairs interleaved -> halves)."""

    def transform(tensor: Any) -> Any:
        rows = tensor.shape[0]
        rest = tuple(tensor.shape[1:])
        return tensor.reshape(heads, rows // heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)

    return transform


def _int_meta(metadata: dict[str, Any], key: str) -> int | None:
    value = metadata.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _reader(path: Path, info: TensorInfo, start: int) -> Callable[[], Any]:
    type_name = GGML_TYPES[info.ggml_type]
    offset = start + info.offset

    if type_name in FLOAT_TYPES:

        def read_float() -> Any:
            return mmap_tensor(path, offset, info.shape, FLOAT_TYPES[type_name], name=info.name)

        return read_float

    def read_blocks() -> Any:
        import numpy as np
        import torch

        assert info.nbytes is not None
        raw = mmap_tensor(path, offset, (info.nbytes,), "uint8", name=info.name)
        values = dequantize(type_name, np.asarray(raw.numpy()))
        return torch.from_numpy(values).reshape(info.shape)

    return read_blocks


def _unreadable(path: Path, info: TensorInfo) -> Callable[[], Any]:
    def fail() -> Any:
        raise InputError(path, f"GGUF tensor {info.name!r} is stored as {info.type_name}, which auditor does not read")

    return fail


def load(path: Path) -> LayerGraph:
    """A GGUF file's layer graph (see the module docstring for what is mapped and undone)."""
    header = read_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else ""
    notes: list[str] = []
    mapped = arch in _LLAMA_LIKE
    heads = _int_meta(meta, f"{arch}.attention.head_count")
    kv_heads = _int_meta(meta, f"{arch}.attention.head_count_kv") or heads
    reorder = arch in _ROPE_REORDERED and heads is not None
    refs: list[tuple[str, TensorRef]] = []
    hints: dict[str, LayerKind] = {}
    quantized: dict[str, str] = {}
    unread: list[str] = []
    reordered = 0
    for info in header.tensors:
        name = (_hf_name(info.name) if mapped else None) or info.name
        module = name.rpartition(".")[0] or name
        hints[module] = _kind(info.name, info.shape)
        transform = None
        if reorder and info.name.endswith((".attn_q.weight", ".attn_k.weight")) and len(info.shape) == 2:
            n = heads if info.name.endswith(".attn_q.weight") else kv_heads
            assert n is not None
            if info.shape[0] % (2 * n) == 0:
                transform = _unpermute(n)
                reordered += 1
            else:
                notes.append(f"{info.name}: {info.shape[0]} rows are not whole pairs of {n} heads; row order kept")
        if info.ggml_type in GGML_TYPES:
            reader = _reader(path, info, header.data_start)
            type_name = GGML_TYPES[info.ggml_type]
            dtype = FLOAT_TYPES.get(type_name, "float32")
            if type_name not in FLOAT_TYPES:
                quantized[module] = type_name
        else:
            reader, dtype = _unreadable(path, info), "float32"
            unread.append(f"{info.name} ({info.type_name})")
        refs.append((name, TensorRef(name, info.shape, dtype, reader, transform=transform)))
    if mapped:
        notes.append(
            f"GGUF names of architecture {arch!r} mapped back to the Hugging Face checkpoint's "
            "(blk.N.attn_q -> model.layers.N.self_attn.q_proj, ...)"
        )
    elif arch:
        notes.append(f"GGUF names of architecture {arch!r} kept as they are (no mapping to the original names)")
    if reordered:
        notes.append(
            f"llama.cpp's rotary row order of the query and key weights undone in {reordered} tensors "
            f"({heads} query heads, {kv_heads} key/value heads)"
        )
    elif arch and arch not in _ROPE_REORDERED:
        notes.append(f"query/key rows kept in file order (llama.cpp does not reorder them for {arch!r})")
    if quantized:
        kinds = sorted(set(quantized.values()))
        notes.append(f"{len(quantized)} layers dequantised to float32 on reading, from {', '.join(kinds)}")
    if unread:
        notes.append(f"{len(unread)} tensors in types auditor does not read: {', '.join(unread[:5])}")
    summary = {k: v for k, v in meta.items() if not k.startswith("tokenizer.ggml.")}
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        notes.append("the chat template (Jinja) is recorded by its length only and never rendered")
        length = len(template) if isinstance(template, str) else template.get("length")
        summary["tokenizer.chat_template"] = {"type": "string", "length": length}
    summary["gguf.version"] = header.version
    graph = graph_from_tensors(
        "gguf", path, refs, files=[path], metadata=summary, kind_hints=hints, notes=notes, order="file order"
    )
    for layer in graph.layers:
        if layer.name in quantized:
            layer.attrs["quantized"] = {"format": "gguf", "dtype": quantized[layer.name]}
    return graph


class GGUFFormat(Format):
    """GGUF files of llama.cpp and the tools built on it."""

    id = "gguf"

    def sniff(self, path: Path, head: bytes) -> bool:
        return sniff(path, head)

    def load(self, path: Path) -> LayerGraph:
        return load(path)


@hookimpl
def register_formats(register: Callable[[Format], None]) -> None:
    """Register the GGUF format."""
    register(GGUFFormat())
