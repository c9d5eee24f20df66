"""Fashion-MNIST's IDX files, read as hostile input: nothing is downloaded, nothing trusted.

An IDX file is two zero bytes, a data-type code (0x08: unsigned bytes, the
only type Fashion-MNIST uses), the number of dimensions, each dimension as a
big-endian uint32, then the data in C order. Files may be gzipped (detected by
the gzip magic 1f 8b, not by the name). Sizes are checked against a cap before
anything is allocated and decompression never produces more than the cap.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from auditor.errors import InputError
from auditor.safeio import check_path, open_regular
from auditor.toolkit.data import Dataset, tensors_sha256

__all__ = ["FASHION_MNIST_FILES", "MAX_IDX_BYTES", "fashion_mnist", "read_idx", "write_idx"]

MAX_IDX_BYTES = 128 << 20
"""Largest IDX content accepted (header and data, after decompression); Fashion-MNIST's
training images are 47,040,016 bytes."""

MAX_DIMS = 4
UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _read_raw(path: Path, limit: int) -> bytes:
    """The file's content, decompressed when it starts with the gzip magic, at most ``limit`` bytes.

    Only a regular file of at most ``limit`` bytes is opened (a pipe or a device is refused unopened);
    gzipped, its content is cut at ``limit`` bytes too."""
    too_large = f"the IDX file is larger than the {limit:,d}-byte limit"
    if check_path(path, what="an IDX file").st_size > limit:
        raise InputError(path, too_large)
    try:
        with open_regular(path, what="an IDX file") as fh:
            head = fh.read(2)
            fh.seek(0)
            if head != GZIP_MAGIC:
                data = fh.read(limit + 1)
                if len(data) > limit:
                    raise InputError(path, too_large)
                return data
            try:
                with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                    data = gz.read(limit + 1)  # bounded: a gzip bomb stops here
            except (OSError, EOFError, zlib.error) as exc:
                raise InputError(path, f"the gzip data is damaged: {exc}") from None
            if len(data) > limit:
                raise InputError(path, f"the IDX file decompresses to more than the {limit:,d}-byte limit")
            return data
    except OSError as exc:
        raise InputError(path, f"cannot read the file: {exc.strerror or exc}") from None


def read_idx(path: Path, *, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """The array an unsigned-byte IDX file holds (gzipped or not), as ``uint8`` of its declared shape.

    Raises :class:`~auditor.errors.InputError` naming the file for a bad magic,
    another data type, no or too many dimensions, a zero dimension, a size over
    ``max_bytes``, data shorter or longer than the header declares, or damaged gzip data.
    """
    path = Path(path)
    data = _read_raw(path, max_bytes)
    if len(data) < 4:
        raise InputError(path, f"not an IDX file: {len(data)} bytes, shorter than the 4-byte magic")
    if data[0:2] != b"\x00\x00":
        raise InputError(path, f"not an IDX file: bad magic 0x{data[0:4].hex()}")
    if data[2] != UBYTE:
        raise InputError(path, f"IDX data type 0x{data[2]:02x} is not supported (only 0x08, unsigned bytes)")
    ndim = data[3]
    if not 1 <= ndim <= MAX_DIMS:
        raise InputError(path, f"the IDX header declares {ndim} dimensions (1 to {MAX_DIMS} accepted)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise InputError(path, f"truncated: the header needs {header} bytes, the file holds {len(data)}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if 0 in shape:
        raise InputError(path, f"the IDX header declares an empty array of shape {shape}")
    size = 1
    for dim in shape:
        size *= dim  # Python ints: no overflow, checked before anything is allocated
    if header + size > max_bytes:
        raise InputError(
            path, f"the IDX header declares shape {shape} ({size:,d} bytes), over the {max_bytes:,d}-byte limit"
        )
    held = len(data) - header
    if held < size:
        raise InputError(path, f"truncated: the header declares {size:,d} bytes of data, the file holds {held:,d}")
    if held > size:
        raise InputError(path, f"{held - size:,d} bytes after the {size:,d} bytes of data the header declares")
    return np.frombuffer(data, dtype=np.uint8, count=size, offset=header).reshape(shape).copy()


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        candidate = folder / name
        if candidate.exists():  # read_idx refuses, by name, one that is a pipe, a device or a folder
            return candidate
    raise InputError(folder, f"no {stem} or {stem}.gz in this folder (the Fashion-MNIST file names)")


def _pair(folder: Path, images_stem: str, labels_stem: str) -> TensorDataset:
    images_path, labels_path = _find(folder, images_stem), _find(folder, labels_stem)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise InputError(images_path, f"expected images of shape (N, rows, columns), got shape {images.shape}")
    if labels.ndim != 1:
        raise InputError(labels_path, f"expected labels of shape (N,), got shape {labels.shape}")
    if len(labels) != len(images):
        raise InputError(labels_path, f"{len(labels):,d} labels for {len(images):,d} images in {images_path.name}")
    if int(labels.max()) > 9:
        raise InputError(labels_path, f"label {int(labels.max())} is not a Fashion-MNIST class (0 to 9)")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def fashion_mnist(folder: Path) -> Dataset:
    """Fashion-MNIST from the four standard IDX files in ``folder`` (each gzipped or not):
    float32 images in [0, 1] of shape ``(N, 1, 28, 28)``, int64 labels, the standard
    train/test split (``split_seed`` is ``None``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder (expected the folder holding the Fashion-MNIST IDX files)")
    names = FASHION_MNIST_FILES
    train = _pair(folder, names["train_images"], names["train_labels"])
    test = _pair(folder, names["test_images"], names["test_labels"])
    if train.tensors[0].shape[1:] != test.tensors[0].shape[1:]:
        raise InputError(
            folder,
            f"training images are {tuple(train.tensors[0].shape[2:])} but test images "
            f"{tuple(test.tensors[0].shape[2:])}",
        )
    shape = tuple(int(s) for s in train.tensors[0].shape[1:])
    return Dataset("fashion-mnist", train, test, 10, shape, None, tensors_sha256(test))


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> None:
    """Write ``array`` (unsigned bytes) as an IDX file, gzipped when ``compress`` (for tests and tools)."""
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    buf = io.BytesIO()
    buf.write(bytes([0, 0, UBYTE, arr.ndim]))
    for dim in arr.shape:
        buf.write(int(dim).to_bytes(4, "big"))
    buf.write(arr.tobytes())
    raw = buf.getvalue()
    Path(path).write_bytes(gzip.compress(raw, mtime=0) if compress else raw)
