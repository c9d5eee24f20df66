"""Regenerate the safetensors test assets (``st_*``) in this folder, byte for byte.

Run ``python tests/assets/make_st_assets.py`` from the repository root. Values
come from numpy's seeded PCG64 generator, so the files do not depend on the
torch version; tests/test_format_safetensors.py checks that a fresh build
matches the committed files.

* ``st_cnn.safetensors``: a Sequential CNN (conv -> batch-norm -> conv -> flatten -> linear), float32;
* ``st_truncated_header.safetensors``: five bytes, not even a header length;
* ``st_header_cut.safetensors``: the first 40 bytes of ``st_cnn``, the header cut short;
* ``st_header_too_long.safetensors``: a header length of 10**15 bytes;
* ``st_header_not_json.safetensors``, ``st_header_list.safetensors``: a broken and a non-object header;
* ``st_truncated_data.safetensors``: ``st_cnn`` cut in the middle of its data;
* ``st_size_mismatch.safetensors``: a shape that needs more bytes than its offsets span;
* ``st_negative_shape.safetensors``, ``st_float_shape.safetensors``: invalid shapes;
* ``st_unsupported_dtype.safetensors``: one float32 tensor and one float8 tensor auditor skips;
* ``st_empty.safetensors``: zero bytes; ``st_random.safetensors``: 1 KiB of random bytes.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 20240611


def encode(header: dict | list | str, data: bytes = b"") -> bytes:
    """A safetensors file: 8-byte little-endian header length, the JSON header, the data."""
    raw = (header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def cnn_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The state dict of ``Sequential(Conv2d(3, 8, 3), BatchNorm2d(8), ReLU, Conv2d(8, 16, 3), ReLU,
    Flatten, Linear(16 * 4 * 4, 10))`` on 8x8 inputs, with seeded values."""

    def f32(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "0.weight": f32(8, 3, 3, 3),
        "0.bias": f32(8),
        "1.weight": f32(8),
        "1.bias": f32(8),
        "1.running_mean": f32(8),
        "1.running_var": np.abs(f32(8)) + 0.5,
        "1.num_batches_tracked": np.array(7, dtype=np.int64),
        "3.weight": f32(16, 8, 3, 3),
        "3.bias": f32(16),
        "6.weight": f32(10, 256),
        "6.bias": f32(10),
    }


def save(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes the safetensors library writes for ``tensors``."""
    from safetensors.numpy import save as st_save

    return st_save(tensors, metadata=metadata)


def build(out: Path) -> list[Path]:
    """Write every ``st_*`` asset into ``out``; return their paths."""
    rng = np.random.default_rng(SEED)
    cnn = save(cnn_tensors(rng), metadata={"format": "pt"})
    one = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    data16 = np.arange(4, dtype="<f4").tobytes()
    files = {
        "st_cnn.safetensors": cnn,
        "st_truncated_header.safetensors": b"\x10\x00\x00\x00\x00",
        "st_header_cut.safetensors": cnn[:40],
        "st_header_too_long.safetensors": struct.pack("<Q", 10**15) + b'{"w":{}}',
        "st_header_not_json.safetensors": encode(json.dumps(one)[:-1], data16),
        "st_header_list.safetensors": encode([one], data16),
        "st_truncated_data.safetensors": cnn[: len(cnn) - 1000],
        "st_size_mismatch.safetensors": encode(
            {"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, data16
        ),
        "st_negative_shape.safetensors": encode(
            {"w": {"dtype": "F32", "shape": [-2, 2], "data_offsets": [0, 16]}}, data16
        ),
        "st_float_shape.safetensors": encode(
            {"w": {"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}}, data16
        ),
        "st_unsupported_dtype.safetensors": encode(
            {
                "fc.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                "fc.scale": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [16, 20]},
            },
            data16 + bytes([56, 64, 72, 80]),
        ),
        "st_empty.safetensors": b"",
        "st_random.safetensors": rng.integers(0, 256, 1024, dtype=np.uint8).tobytes(),
    }
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in files.items():
        (out / name).write_bytes(content)
        written.append(out / name)
    return written


if __name__ == "__main__":
    for path in build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(f"{path.stat().st_size:>8,d}  {path}")
