"""GGML's block-quantised tensor types, dequantised to float32 with numpy.

Each type stores ``block`` weights in ``size`` bytes; a row's length must be a
multiple of ``block``. The layouts are ggml's (``ggml-common.h``,
``dequantize_row_*`` in ``ggml-quants.c``), all little-endian:

* ``Q8_0``: f16 scale ``d``, 32 int8 ``q``: ``d * q``.
* ``Q4_0``: ``d``, 16 bytes of nibbles (low nibbles are weights 0-15, high 16-31): ``d * (q - 8)``.
* ``Q4_1``: ``d``, f16 minimum ``m``, nibbles: ``d * q + m``.
* ``Q5_0`` / ``Q5_1``: as ``Q4_*`` with a fifth bit per weight from a 32-bit mask (``q - 16`` for ``Q5_0``).
* ``Q4_K`` / ``Q5_K``: super-blocks of 256: f16 ``d`` and ``dmin``, eight 6-bit scales and minimums packed
  in 12 bytes, then the fifth bits (``Q5_K``) and the nibbles; sub-block ``j`` is ``d*sc[j]*q - dmin*m[j]``.
* ``Q6_K``: 256 weights as 4 low bits, 2 high bits, sixteen int8 scales and an f16 ``d`` at the end:
  ``d * sc * (q - 32)``.

Nothing here trusts a count: the caller has already checked that the bytes
cover ``rows x row_length`` weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["BLOCK_TYPES", "CHUNK_BLOCKS", "FLOAT_TYPES", "GGML_TYPES", "dequantize", "row_bytes"]

#: GGML type code -> name, for every type this module or the float path reads.
GGML_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    30: "BF16",
}
#: Types stored as plain little-endian floats: name -> the graph's dtype name.
FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
#: name -> (weights per block, bytes per block).
BLOCK_TYPES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
#: Other GGML type codes that appear in real files (named in messages; not dequantised).
KNOWN_UNREAD: dict[int, str] = {
    10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
    21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip


def row_bytes(type_name: str, length: int) -> int | None:
    """Bytes one row of ``length`` weights takes, or ``None`` when ``length`` is not a whole number of blocks."""
    block, size = BLOCK_TYPES[type_name]
    if length % block:
        return None
    return length // block * size


def _half(raw: np.ndarray) -> np.ndarray:
    """Little-endian f16 values from an ``(n, 2)`` uint8 array, as float32 of shape ``(n, 1)``."""
    import numpy as np

    return np.ascontiguousarray(raw).view("<f2").astype(np.float32).reshape(-1, 1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Low nibbles then high nibbles of each row of bytes: ``(n, 16)`` -> ``(n, 32)`` values 0-15."""
    import numpy as np

    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _fifth_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Bit ``j`` of each little-endian mask in ``qh`` (``(n, count // 8)`` bytes), as ``(n, count)`` 0/1."""
    import numpy as np

    return np.unpackbits(qh, axis=1, bitorder="little")[:, :count]


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and minimums packed in 12 bytes (ggml's ``get_scale_min_k4``)."""
    import numpy as np

    q = scales.astype(np.uint8)
    sc = np.empty((q.shape[0], 8), dtype=np.uint8)
    mn = np.empty((q.shape[0], 8), dtype=np.uint8)
    sc[:, :4] = q[:, 0:4] & 63
    mn[:, :4] = q[:, 4:8] & 63
    sc[:, 4:] = (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_quads(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K nibbles: four chunks of 32 bytes, each giving 32 low-nibble then 32 high-nibble weights."""
    import numpy as np

    chunks = qs.reshape(-1, 4, 32)
    return np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 256)


#: Blocks dequantised at a time (32,768 weights of the 32-weight types, 262,144 of the k-quants): the
#: temporaries of one chunk stay in the cache and bounded in memory (a 7B model's MLP matrix is 45 million
#: weights), and stay small enough to come from the heap rather than fresh pages.
CHUNK_BLOCKS = 1024


def dequantize(type_name: str, raw: np.ndarray) -> np.ndarray:
    """The float32 weights of ``raw`` (uint8 bytes, a whole number of blocks of ``type_name``), flat.

    The blocks are read :data:`CHUNK_BLOCKS` at a time, each chunk written into the one result array, so
    the memory used beyond the result (and the raw bytes, often a map of the file) is one chunk's
    temporaries whatever the tensor's size."""
    import numpy as np

    block, size = BLOCK_TYPES.get(type_name, (1, 0))
    if block == 1:
        raise ValueError(f"no dequantisation for GGML type {type_name}")
    b = np.asarray(raw, dtype=np.uint8).reshape(-1, size)
    out = np.empty((b.shape[0], block), dtype=np.float32)
    for start in range(0, b.shape[0], CHUNK_BLOCKS):
        chunk, into = b[start : start + CHUNK_BLOCKS], out[start : start + CHUNK_BLOCKS]
        if type_name == "Q8_0":  # the common type: one pass, no temporaries
            np.multiply(chunk[:, 2:].view(np.int8), _half(chunk[:, :2]), out=into, dtype=np.float32)
        else:
            into.reshape(-1)[:] = _blocks(type_name, chunk).reshape(-1)
    return out.reshape(-1)


def _blocks(type_name: str, b: np.ndarray) -> np.ndarray:
    """The float32 weights of the blocks ``b`` (``(n, size)`` uint8) of a type other than Q8_0."""
    import numpy as np

    if type_name == "Q4_0":
        return (_half(b[:, :2]) * (_nibbles(b[:, 2:]).astype(np.float32) - 8)).reshape(-1)
    if type_name == "Q4_1":
        return (_half(b[:, :2]) * _nibbles(b[:, 4:]).astype(np.float32) + _half(b[:, 2:4])).reshape(-1)
    if type_name == "Q5_0":
        q = _nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6], 32) << 4)
        return (_half(b[:, :2]) * (q.astype(np.float32) - 16)).reshape(-1)
    if type_name == "Q5_1":
        q = _nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8], 32) << 4)
        return (_half(b[:, :2]) * q.astype(np.float32) + _half(b[:, 2:4])).reshape(-1)
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = _half(b[:, :2]), _half(b[:, 2:4])
        sc, mn = _k_scales(b[:, 4:16])
        if type_name == "Q4_K":
            q = _k_quads(b[:, 16:144])
        else:
            # Fifth bits: weight l of sub-block j (32 weights each) is bit j of qh[l].
            qh = b[:, 16:48]
            bits = np.unpackbits(qh[:, :, None], axis=2, bitorder="little")  # (n, 32 bytes, 8 bits)
            high = bits.transpose(0, 2, 1).reshape(-1, 256)  # sub-block j, weight l
            q = _k_quads(b[:, 48:176]) | (high << 4)
        q = q.reshape(-1, 8, 32).astype(np.float32)
        return (d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * mn[:, :, None]).reshape(-1)
    if type_name == "Q6_K":
        ql, qh = b[:, :128], b[:, 128:192]
        scales = b[:, 192:208].view(np.int8).astype(np.float32)
        d = _half(b[:, 208:210])
        out = np.empty((b.shape[0], 2, 4, 32), dtype=np.float32)
        for half in range(2):  # two halves of 128 weights: 64 bytes of ql, 32 of qh, 8 scales each
            lo = ql[:, 64 * half : 64 * half + 64]
            hi = qh[:, 32 * half : 32 * half + 32]
            quads = (
                (lo[:, :32] & 0x0F) | (((hi >> 0) & 3) << 4),
                (lo[:, 32:] & 0x0F) | (((hi >> 2) & 3) << 4),
                (lo[:, :32] >> 4) | (((hi >> 4) & 3) << 4),
                (lo[:, 32:] >> 4) | (((hi >> 6) & 3) << 4),
            )
            for k, q in enumerate(quads):
                # weight l of quarter k uses scale 8*half + 2*k + l // 16
                s = scales[:, 8 * half + 2 * k : 8 * half + 2 * k + 2].repeat(16, axis=1)
                out[:, half, k] = d * s * (q.astype(np.float32) - 32)
        return out
    raise ValueError(f"no dequantisation for GGML type {type_name}")
