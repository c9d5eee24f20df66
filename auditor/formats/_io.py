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
from typing import TYPE_CHECKING, Any, BinaryIO

from auditor.errors import InputError, UnsafeInputError
from auditor.graph import itemsize, torch_dtype
from auditor.safeio import check_path, open_regular

if TYPE_CHECKING:  # numpy and torch load when a tensor is read, not when a format registers
    import numpy as np
    import torch

__all__ = ["inside_folder", "mmap_tensor", "numpy_dtype", "read_exact"]

# numpy dtype codes (little-endian) used to map each auditor dtype; bfloat16 maps as raw uint16.
_NUMPY_CODES: dict[str, str] = {
    "float64": "<f8",
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "<u2",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
}


def numpy_dtype(dtype: str) -> np.dtype[Any]:
    """The numpy dtype (little-endian) that maps auditor's ``dtype``; bfloat16 maps as raw uint16."""
    import numpy as np

    return np.dtype(_NUMPY_CODES[dtype])


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
    try:
        os.fsencode(relative)
    except UnicodeEncodeError:  # a lone surrogate from JSON: no file system holds such a name
        raise InputError(origin, f"{what} has a file name that is not valid text ({relative!r})") from None
    try:
        root = base.resolve()
        target = (base / rel).resolve()
        if not target.is_relative_to(root):
            raise UnsafeInputError(origin, f"{what} {relative!r} is a link that leaves the model's folder")
        if not target.is_file():
            if target.exists():  # a folder, a pipe or a device: refused by name, never opened
                check_path(target, what=f"{what} {relative!r}")
            raise InputError(origin, f"{what} {relative!r} does not exist next to the model")
    except OSError as exc:  # a name too long, a link loop
        raise InputError(origin, f"{what} {relative!r} cannot be looked up: {exc.strerror or exc}") from None
    return target


def mmap_tensor(
    path: Path, offset: int, shape: tuple[int, ...], dtype: str, *, name: str, origin: Path | None = None
) -> torch.Tensor:
    """A tensor mapped copy-on-write from ``path`` at byte ``offset`` (little-endian, C order).

    The range is checked against the file size first, so a header that claims
    more than the file holds fails with a message instead of a bus error.
    """
    import numpy as np
    import torch

    numel = math.prod(shape)
    nbytes = numel * itemsize(dtype)
    size = os.stat(path).st_size
    if offset < 0 or offset + nbytes > size:
        raise InputError(
            origin or path,
            f"tensor {name!r} needs bytes {offset}..{offset + nbytes} "
            f"but {path.name} holds only {size} bytes (truncated?)",
        )
    if numel == 0:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    with open_regular(path, what="a model file") as fh:  # the map keeps its own descriptor
        array = np.memmap(fh, dtype=numpy_dtype(dtype), mode="c", offset=offset, shape=(numel,))
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
