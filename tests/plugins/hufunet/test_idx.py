"""Fashion-MNIST IDX files as hostile input, and HufuNet generation on tiny ones."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from auditor.errors import InputError
from auditor.plugins.hufunet import generate as gen
from auditor.plugins.hufunet.idx import FASHION_MNIST_FILES, fashion_mnist, read_idx, write_idx


def _images(n: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_plain_and_gzipped(tmp_path: Path, compress: bool) -> None:
    images = _images()
    path = tmp_path / "images"  # no .gz: gzip is recognised by its content
    write_idx(path, images, compress=compress)
    assert path.read_bytes()[:2] == (b"\x1f\x8b" if compress else b"\x00\x00")
    got = read_idx(path)
    assert got.dtype == np.uint8 and np.array_equal(got, images)


def _header(dtype: int, dims: list[int]) -> bytes:
    return bytes([0, 0, dtype, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not an IDX file: 0 bytes, shorter than the 4-byte magic"),
        (b"PK\x03\x04rest", "not an IDX file: bad magic 0x504b0304"),
        (_header(0x0D, [2]) + bytes(8), "IDX data type 0x0d is not supported (only 0x08, unsigned bytes)"),
        (_header(0x08, []), "the IDX header declares 0 dimensions (1 to 4 accepted)"),
        (bytes([0, 0, 8, 9]), "the IDX header declares 9 dimensions (1 to 4 accepted)"),
        (bytes([0, 0, 8, 3]) + bytes(4), "truncated: the header needs 16 bytes, the file holds 8"),
        (_header(0x08, [2, 0]), "the IDX header declares an empty array of shape (2, 0)"),
        (
            _header(0x08, [0xFFFFFFFF, 0xFFFFFFFF, 28]),
            "the IDX header declares shape (4294967295, 4294967295, 28) "
            "(516,508,833,823,349,276,700 bytes), over the 134,217,728-byte limit",
        ),
        (
            _header(0x08, [20, 28, 28]) + bytes(100),
            "truncated: the header declares 15,680 bytes of data, the file holds 100",
        ),
        (_header(0x08, [3]) + bytes(5), "2 bytes after the 3 bytes of data the header declares"),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_hostile_idx_files(tmp_path: Path, content: bytes, message: str, compress: bool) -> None:
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(gzip.compress(content, mtime=0) if compress else content)
    with pytest.raises(InputError) as info:
        read_idx(path)
    assert str(info.value) == f"{path}: {message}"


def test_damaged_gzip_and_gzip_bomb(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    whole = gzip.compress(_header(0x08, [1000]) + bytes(1000), mtime=0)
    path.write_bytes(whole[:-12])
    with pytest.raises(InputError, match=f"^{path}: the gzip data is damaged: "):
        read_idx(path)
    path.write_bytes(gzip.compress(bytes(1 << 20), mtime=0))  # 1 MiB of zeros, ~1 KiB compressed
    with pytest.raises(InputError) as info:
        read_idx(path, max_bytes=4096)
    assert str(info.value) == f"{path}: the IDX file decompresses to more than the 4,096-byte limit"
    path.write_bytes(_header(0x08, [5000]) + bytes(5000))
    with pytest.raises(InputError) as info:
        read_idx(path, max_bytes=4096)
    assert str(info.value) == f"{path}: the IDX file is larger than the 4,096-byte limit"


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        read_idx(tmp_path / "nope")
    assert str(info.value) == f"{tmp_path / 'nope'}: no such file"
    with pytest.raises(InputError) as info:
        fashion_mnist(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: no train-images-idx3-ubyte or train-images-idx3-ubyte.gz in this folder "
        "(the Fashion-MNIST file names)"
    )


def _fashion_folder(folder: Path, n_train: int = 40, n_test: int = 20) -> Path:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    write_idx(folder / f"{FASHION_MNIST_FILES['train_images']}.gz", _images(n_train, 2), compress=True)
    write_idx(folder / f"{FASHION_MNIST_FILES['train_labels']}.gz", rng.integers(0, 10, n_train), compress=True)
    write_idx(folder / FASHION_MNIST_FILES["test_images"], _images(n_test, 3))
    write_idx(folder / FASHION_MNIST_FILES["test_labels"], np.arange(n_test) % 10)
    return folder


def test_fashion_mnist_dataset(tmp_path: Path) -> None:
    data = fashion_mnist(_fashion_folder(tmp_path / "fm"))
    x, y = data.test.tensors
    assert data.name == "fashion-mnist" and data.split_seed is None and data.num_classes == 10
    assert x.shape == (20, 1, 28, 28) and str(x.dtype) == "torch.float32" and float(x.max()) <= 1.0
    assert data.train.tensors[0].shape == (40, 1, 28, 28) and y.tolist() == [i % 10 for i in range(20)]
    assert data.input_shape == (1, 28, 28) and len(data.test_sha256) == 64


def test_fashion_mnist_inconsistent_files(tmp_path: Path) -> None:
    folder = _fashion_folder(tmp_path / "fm")
    labels = folder / FASHION_MNIST_FILES["test_labels"]
    write_idx(labels, np.arange(19) % 10)
    with pytest.raises(InputError) as info:
        fashion_mnist(folder)
    assert str(info.value) == f"{labels}: 19 labels for 20 images in t10k-images-idx3-ubyte"
    write_idx(labels, np.full(20, 12))
    with pytest.raises(InputError) as info:
        fashion_mnist(folder)
    assert str(info.value) == f"{labels}: label 12 is not a Fashion-MNIST class (0 to 9)"
    images = folder / FASHION_MNIST_FILES["test_images"]
    write_idx(images, np.zeros(20 * 784, dtype=np.uint8))
    with pytest.raises(InputError) as info:
        fashion_mnist(folder)
    assert str(info.value) == f"{images}: expected images of shape (N, rows, columns), got shape (15680,)"


def test_generate_on_tiny_fashion_mnist(tmp_path: Path, one_thread: None) -> None:
    folder = _fashion_folder(tmp_path / "fm")
    out = tmp_path / "fm.secret.json"
    summary = gen.generate_hufunet(out=out, fashion_mnist=folder, epochs=1, seed=3)
    assert summary["dataset"] == "fashion-mnist" and summary["test_size"] == 20
    net, payload = gen.load_hufunet(out)
    assert payload["dataset"]["name"] == "fashion-mnist" and payload["dataset"]["split"] == "standard"
    assert payload["dataset"]["split_seed"] is None and payload["acc_original"] == summary["accuracy"]
    assert payload["dataset"]["test_sha256"] == fashion_mnist(folder).test_sha256
    from auditor.plugins.hufunet.network import accuracy

    assert accuracy(net, fashion_mnist(folder)) == summary["accuracy"]


def test_a_pipe_or_a_device_named_as_an_idx_file_is_refused_unopened(
    tmp_path: Path, special_files: SimpleNamespace
) -> None:
    pipe = tmp_path / FASHION_MNIST_FILES["train_images"]
    os.mkfifo(pipe)
    (tmp_path / FASHION_MNIST_FILES["train_labels"]).write_bytes(b"")
    with pytest.raises(InputError) as info:
        fashion_mnist(tmp_path)
    assert str(info.value) == f"{pipe}: is a named pipe (FIFO), not a regular file: auditor reads only regular files"
    with pytest.raises(InputError) as info:
        read_idx(special_files.device)
    assert info.value.problem == "is a character device, not a regular file: auditor reads only regular files"
