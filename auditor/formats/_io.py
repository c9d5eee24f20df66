"""Shared, hostile-input-safe file access for the format loaders.

Loaders treat every file as hostile: paths are resolved only inside the
model's own folder, every size is checked against the file before anything is
allocated, and tensors are memory-mapped copy-on-write so that nothing a
plugin does to a tensor can change the user's file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from auditor.errors import InputError, UnsafeInputError
from auditor.graph import torch_dtype

__all__ = ["NUMPY_DTYPES", "inside_folder", "mmap_tensor", "read_exact"]

#: numpy dtypes (little-endian) used to map each auditor dtype; bfloat16 maps as raw uint16.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}


def inside_folder(base: Path, relative: str, *, what: str, origin: Path) -> Path:
    """``relative`` resolved under ``base``; refuses absolute paths, ``..`` and links that leave it.

    ``origin`` is the file that named the path (for the error message).
    """
    if not relative or "\x00" in relative:
        raise InputError(origin, f"{what} has an empty or invalid file name")
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")) or (len(relative) > 1 and relative[1] == ":"):
        raise UnsafeInputError(
            origin, f"{what} points to the absolute path {relative!r}; only files inside the model's folder are read"
        )
    if ".." in rel.parts or ".." in relative.replace("\\", "/").split("/"):
        raise UnsafeInputError(origin, f"{what} points outside the model's folder ({relative!r})")
    root = base.resolve()
    target = (base / rel).resolve()
    if not target.is_relative_to(root):
        raise UnsafeInputError(origin, f"{what} {relative!r} is a link that leaves the model's folder")
    if not target.is_file():
        raise InputError(origin, f"{what} {relative!r} does not exist next to the model")
    return target


def mmap_tensor(
    path: Path, offset: int, shape: tuple[int, ...], dtype: str, *, name: str, origin: Path | None = None
) -> torch.Tensor:
    """A tensor mapped copy-on-write from ``path`` at byte ``offset`` (little-endian, C order).

    The range is checked against the file size first, so a header that claims
    more than the file holds fails with a message instead of a bus error.
    """
    np_dtype = NUMPY_DTYPES[dtype]
    numel = math.prod(shape)
    nbytes = numel * np_dtype.itemsize
    size = os.stat(path).st_size
    if offset < 0 or offset + nbytes > size:
        raise InputError(
            origin or path,
            f"tensor {name!r} needs bytes {offset}..{offset + nbytes} "
            f"but {path.name} holds only {size} bytes (truncated?)",
        )
    if numel == 0:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    array = np.memmap(path, dtype=np_dtype, mode="c", offset=offset, shape=(numel,))
    tensor = torch.from_numpy(array)
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.reshape(shape)


def read_exact(fh: BinaryIO, n: int, *, path: Path, what: str) -> bytes:
    """Exactly ``n`` bytes from ``fh`` or an InputError naming ``what`` as truncated."""
    data = fh.read(n)
    if len(data) != n:
        raise InputError(path, f"truncated: {what} needs {n} bytes, the file has {len(data)} left")
    return data
