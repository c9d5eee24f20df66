"""Training data for the embedders: the bundled digits, fixed splits, the owner's own factories.

The built-in data set is scikit-learn's 8x8 digits, which ships inside the
package: nothing is downloaded. Splits are stratified and seeded, and the
test split's SHA-256 is recorded so a bundle says exactly which images the
reported accuracy was measured on.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from auditor.errors import AuditorError, InputError, UsageError

__all__ = [
    "MAX_FACTORY_BYTES",
    "Dataset",
    "digits",
    "from_factory_result",
    "load_factory",
    "owner_dataset",
    "split",
    "tensors_sha256",
]

#: A factory's module file (``module:function`` or ``file.py:function``) is checked to be a regular file
#: before Python reads it, and a source file to be at most this size.
MAX_FACTORY_BYTES = 16 << 20


@dataclass
class Dataset:
    """A train/test pair of ``(inputs, labels)`` tensor data sets and what describes them.

    ``input_shape`` is one input's shape without the batch axis; ``split_seed``
    is the seed of the train/test split (``None`` when the owner supplied the
    split); ``test_sha256`` identifies the test split (:func:`tensors_sha256`).
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    split_seed: int | None
    test_sha256: str

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for a bundle or a report."""
        return {
            "name": self.name,
            "train_size": len(self.train),
            "test_size": len(self.test),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "split_seed": self.split_seed,
            "test_sha256": self.test_sha256,
        }


def tensors_sha256(data: TensorDataset) -> str:
    """SHA-256 of a tensor data set: the C-order bytes of each tensor in turn
    (for digits, the float32 images then the int64 labels)."""
    digest = hashlib.sha256()
    for t in data.tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    counts = np.bincount(labels) if labels.size else np.array([])
    stratify = labels if counts.size and counts[counts > 0].min() >= 2 else None
    size = min(max(round(fraction * len(labels)), 1), len(labels) - 1)
    first, rest = train_test_split(index, train_size=size, random_state=seed, stratify=stratify)
    return np.sort(first), np.sort(rest)


def digits(*, split_seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as float32 in
    [0, 1] of shape ``(N, 1, 8, 8)`` with int64 labels, split into train and test
    with stratification and ``split_seed``."""
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise UsageError(f"test fraction must be between 0 and 1, not {test_fraction}")
    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    test_idx, train_idx = _stratified_indices(labels, test_fraction, split_seed)
    train = TensorDataset(torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx]))
    test = TensorDataset(torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx]))
    return Dataset("digits", train, test, 10, (1, 8, 8), split_seed, tensors_sha256(test))


def split(data: TensorDataset | Dataset, fraction: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """``data`` cut in two, stratified by its labels (the last tensor) where every
    class has two examples: the first part holds ``fraction`` of it.

    A :class:`Dataset` is cut from its training split. This is how an attacker
    with "a different split" of the owner's data is simulated, for example
    ``split(digits(split_seed=1), 0.5, seed=7)``.
    """
    source = data.train if isinstance(data, Dataset) else data
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"split fraction must be between 0 and 1, not {fraction}")
    labels = source.tensors[-1].detach().cpu().numpy()
    if labels.dtype.kind not in "iu":
        labels = np.zeros(len(labels), dtype=np.int64)
    first, rest = _stratified_indices(labels.astype(np.int64), fraction, seed)
    pick = [torch.from_numpy(first), torch.from_numpy(rest)]
    return (
        TensorDataset(*(t[pick[0]] for t in source.tensors)),
        TensorDataset(*(t[pick[1]] for t in source.tensors)),
    )


def _check_source(path: Path) -> None:
    from auditor.safeio import check_path

    # Python reads a source file whole; compiled and extension modules it maps or loads itself.
    if check_path(path, what="a Python module").st_size > MAX_FACTORY_BYTES and path.suffix == ".py":
        raise InputError(
            path, f"the file is too large for a factory's module (the limit is {MAX_FACTORY_BYTES >> 20} MiB)"
        )


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``module:function`` (``function`` may be dotted,
    ``module`` may be a path to a ``.py`` file).

    The owner names their own code, so importing it (and running its top
    level) is intended; the current folder is searched as well, as
    ``python -m`` would. Raises :class:`~auditor.errors.UsageError` for a
    malformed spec, a module that cannot be imported or a missing attribute,
    and :class:`~auditor.errors.InputError` when the module's file is not a
    regular file (a pipe, a device) or is over :data:`MAX_FACTORY_BYTES`:
    it is checked before Python reads it.
    """
    module_name, sep, attr = spec.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not sep or not module_name or not attr:
        raise UsageError(f"factory {spec!r} is not of the form module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.exists():
                raise UsageError(f"factory {spec!r}: no such file {module_name}")
            _check_source(path)
            mod_spec = importlib.util.spec_from_file_location(f"_auditor_factory_{path.stem}", path)
            if mod_spec is None or mod_spec.loader is None:
                raise UsageError(f"factory {spec!r}: cannot import {module_name}")
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            cwd = str(Path.cwd())
            if cwd not in sys.path and "" not in sys.path:
                sys.path.append(cwd)
            found = importlib.util.find_spec(module_name)
            if found is not None and found.has_location and found.origin and os.path.lexists(found.origin):
                _check_source(Path(found.origin))
            module = importlib.import_module(module_name)
    except AuditorError:
        raise
    except ImportError as exc:
        raise UsageError(f"factory {spec!r}: cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:  # the owner's module failed while importing: say so in one line
        raise UsageError(f"factory {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"factory {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise UsageError(f"factory {spec!r}: {attr!r} is not callable")
    return target


def from_factory_result(result: Any, *, name: str) -> Dataset:
    """A :class:`Dataset` from what an owner's data factory returned: a
    :class:`Dataset`, or a ``(train, test)`` pair of tensor data sets whose last
    tensor holds integer class labels."""
    if isinstance(result, Dataset):
        return result
    if not (isinstance(result, tuple | list) and len(result) == 2):
        raise UsageError(f"data factory {name!r} must return (train, test) TensorDatasets or a Dataset")
    train, test = result
    for part, which in ((train, "train"), (test, "test")):
        if not isinstance(part, TensorDataset) or len(part.tensors) < 2:
            raise UsageError(f"data factory {name!r}: the {which} set is not a TensorDataset of (inputs, labels)")
        labels = part.tensors[-1]
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or labels.ndim != 1:
            raise UsageError(f"data factory {name!r}: the {which} labels must be a 1-d integer tensor")
        if len(part) == 0:
            raise UsageError(f"data factory {name!r}: the {which} set is empty")
    num_classes = int(max(int(train.tensors[-1].max()), int(test.tensors[-1].max()))) + 1
    return Dataset(name, train, test, num_classes, tuple(train.tensors[0].shape[1:]), None, tensors_sha256(test))


def owner_dataset(data_factory: str | None) -> Dataset:
    """The data an embedder or attack trains on: the owner's factory (``module:function``) if
    given, else the bundled digits with the fixed split (seed 0), so accuracies compare across runs."""
    if data_factory:
        return from_factory_result(load_factory(data_factory)(), name=data_factory)
    return digits()
