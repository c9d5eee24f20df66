"""Writing GGUF files as llama.cpp's converter does: for attacks, tests and benchmarks.

A thief who ships a stolen Llama-style model through llama.cpp, Ollama or LM
Studio converts it with ``convert_hf_to_gguf.py`` and quantises it. This
module does the same steps, in numpy, without llama.cpp:

* names mapped from the Hugging Face layout to GGUF's (``model.layers.3.mlp.up_proj`` -> ``blk.3.ffn_up``);
* the query and key rows of each head reordered for llama.cpp's rotary kernel (Llama and Mistral);
* matrices quantised to F16, BF16, Q8_0, Q4_0 or Q4_K (one-dimensional tensors stay F32, as llama.cpp keeps
  them), with ggml's block layouts (:mod:`auditor.formats._gguf_quants` reads them back).

:func:`gguf_bytes` returns the header and, with ``sparse=True``, :func:`write_gguf`
writes only the header and extends the file to its full size without writing
the data (all-zero blocks are valid in every type): a 7-billion-parameter file
costs no disk.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from auditor.formats._gguf_quants import BLOCK_TYPES, row_bytes

__all__ = ["QUANT_TYPES", "GGUFTensor", "gguf_bytes", "hf_to_gguf", "quantize", "write_gguf"]

#: Types :func:`quantize` writes (matrices); GGML type codes.
QUANT_TYPES = {"F32": 0, "F16": 1, "BF16": 30, "Q8_0": 8, "Q4_0": 2, "Q4_K": 12}
_ALIGN = 32
_MAP = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor to write: GGUF name, PyTorch-order shape, GGML type name and (unless sparse) its bytes."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    data: bytes | None = None

    @property
    def nbytes(self) -> int:
        per_row = row_bytes(self.type_name, self.shape[-1])
        if per_row is None:
            raise ValueError(f"{self.name}: rows of {self.shape[-1]} are not whole {self.type_name} blocks")
        return per_row * (int(np.prod(self.shape)) // self.shape[-1])


def _half(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2").view(np.uint8).reshape(-1, 2)


def _q8_0(x: np.ndarray) -> np.ndarray:
    b = x.reshape(-1, 32)
    d = np.abs(b).max(axis=1) / 127
    q = np.where(d[:, None] > 0, np.round(b / np.where(d > 0, d, 1)[:, None]), 0).clip(-127, 127).astype(np.int8)
    return np.concatenate([_half(d), q.view(np.uint8)], axis=1)


def _q4_0(x: np.ndarray) -> np.ndarray:
    b = x.reshape(-1, 32)
    peak = b[np.arange(b.shape[0]), np.abs(b).argmax(axis=1)]  # ggml: the value of largest magnitude, signed
    d = peak / -8
    inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0)
    q = np.minimum(15, np.floor(b * inv[:, None] + 8.5)).clip(0, 15).astype(np.uint8)
    return np.concatenate([_half(d), q[:, :16] | (q[:, 16:] << 4)], axis=1)


def _q4_k(x: np.ndarray) -> np.ndarray:
    b = x.reshape(-1, 8, 32)
    lo = np.minimum(b.min(axis=2), 0)  # the offset is subtracted, so it can only lower the range
    scale = (b.max(axis=2) - lo) / 15
    mins = -lo
    d = scale.max(axis=1) / 63
    dmin = mins.max(axis=1) / 63
    sc = np.where(d[:, None] > 0, np.round(scale / np.where(d > 0, d, 1)[:, None]), 0).clip(0, 63).astype(np.uint8)
    mn = np.where(dmin[:, None] > 0, np.round(mins / np.where(dmin > 0, dmin, 1)[:, None]), 0)
    mn = mn.clip(0, 63).astype(np.uint8)
    step = d[:, None] * sc  # the decoded scale and offset, so that rounding uses what the reader will use
    offset = dmin[:, None] * mn
    q = np.round((b + offset[:, :, None]) / np.where(step > 0, step, 1)[:, :, None])
    q = np.where(step[:, :, None] > 0, q, 0).clip(0, 15).astype(np.uint8)
    packed = np.empty((b.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    pairs = q.reshape(-1, 4, 2, 32)  # chunk c: sub-block 2c in the low nibbles, 2c+1 in the high
    nibbles = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_half(d), _half(dmin), packed, nibbles], axis=1)


def quantize(values: np.ndarray, type_name: str) -> bytes:
    """``values`` (float, rows of whole blocks) stored as ``type_name``, in ggml's layout."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    if type_name == "F32":
        return x.astype("<f4").tobytes()
    if type_name == "F16":
        return x.astype("<f2").tobytes()
    if type_name == "BF16":
        return (x.view(np.uint32) >> 16).astype("<u2").tobytes()  # truncation, as a plain cast does
    block = BLOCK_TYPES[type_name][0]
    if x.shape[-1] % block:
        raise ValueError(f"rows of {x.shape[-1]} are not whole {type_name} blocks of {block}")
    encode = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_K": _q4_k}.get(type_name)
    if encode is None:
        raise ValueError(f"cannot write {type_name} (writes {', '.join(QUANT_TYPES)})")
    return encode(x.reshape(-1)).tobytes()


def _rope_reorder(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for the rotary kernel (``LlamaModel.permute``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf(
    state: Mapping[str, Any], *, heads: int, kv_heads: int | None = None, type_name: str = "F16",
    architecture: str = "llama",
) -> list[GGUFTensor]:  # fmt: skip
    """A Llama-style state dict as llama.cpp's converter writes it (names, rotary row order, quantisation).

    Matrices whose rows are not whole blocks of ``type_name`` fall back to F16,
    as llama.cpp does; one-dimensional tensors are written as F32.
    """
    kv_heads = kv_heads or heads
    out = []
    for key, value in state.items():
        w = value.detach().float().cpu().numpy() if hasattr(value, "detach") else np.asarray(value, np.float32)
        module, _, role = key.rpartition(".")
        m = _LAYER.match(module)
        if module in _TOP:
            name = f"{_TOP[module]}.{role}"
        elif m and m.group(2) in _MAP:
            name = f"blk.{m.group(1)}.{_MAP[m.group(2)]}.{role}"
        else:
            continue  # rotary caches and other buffers are not written
        rope = name.endswith(("attn_q.weight", "attn_k.weight"))
        if architecture in ("llama", "mistral") and rope:
            w = _rope_reorder(w, heads if ".attn_q." in name else kv_heads)
        t = "F32" if w.ndim == 1 else type_name
        if w.ndim > 1 and row_bytes(t, w.shape[-1]) is None:
            t = "F16"
        out.append(GGUFTensor(name, tuple(w.shape), t, quantize(w, t)))
    return out


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, value: Any) -> bytes:
    head = _string(key)
    if isinstance(value, bool):
        return head + struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return head + struct.pack("<IQ", 10, value) if value >= 0 else head + struct.pack("<Iq", 11, value)
    if isinstance(value, float):
        return head + struct.pack("<If", 6, value)
    if isinstance(value, str):
        return head + struct.pack("<I", 8) + _string(value)
    raise TypeError(f"metadata {key!r}: {type(value).__name__} is not written")


def gguf_bytes(tensors: list[GGUFTensor], metadata: Mapping[str, Any]) -> tuple[bytes, list[int]]:
    """The header (padded to the data start) and each tensor's offset from the data start."""
    offsets, at = [], 0
    for t in tensors:
        offsets.append(at)
        at += -(-t.nbytes // _ALIGN) * _ALIGN
    kvs = b"".join(_kv(k, v) for k, v in metadata.items())
    infos = b"".join(
        _string(t.name)
        + struct.pack("<I", len(t.shape))
        + b"".join(struct.pack("<Q", d) for d in reversed(t.shape))
        + struct.pack("<IQ", {**QUANT_TYPES, "Q5_0": 6, "Q5_1": 7, "Q4_1": 3, "Q5_K": 13, "Q6_K": 14}[t.type_name], off)
        for t, off in zip(tensors, offsets, strict=True)
    )
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)) + kvs + infos
    return header + b"\0" * (-len(header) % _ALIGN), offsets


def write_gguf(
    path: Path, tensors: list[GGUFTensor], metadata: Mapping[str, Any], *, sparse: bool = False
) -> Path:
    """Write a GGUF file (``general.architecture`` and the head counts belong in ``metadata``).

    With ``sparse=True`` the tensors' bytes are not written: the file is
    extended to its full length, which reads as zeros and takes no disk.
    """
    header, offsets = gguf_bytes(tensors, metadata)
    end = len(header) + (offsets[-1] + tensors[-1].nbytes if tensors else 0)
    with open(path, "wb") as fh:
        fh.write(header)
        if sparse:
            fh.truncate(end)
            return path
        for t, off in zip(tensors, offsets, strict=True):
            if t.data is None or len(t.data) != t.nbytes:
                raise ValueError(f"{t.name}: {0 if t.data is None else len(t.data)} bytes, {t.nbytes} expected")
            fh.seek(len(header) + off)
            fh.write(t.data)
    return path
