"""What every built-in attack shares: declared options, their parsing, the output checks, and the
pieces of the attacks that train the stolen model.

An attack declares its options as :class:`Param` rows (name, default, help,
allowed values); :meth:`BuiltinAttack.apply` converts the values it is given
(strings from the command line, or Python values), refuses unknown names,
checks ``out`` (:func:`check_out`) and then calls ``run``. Every attack takes
``seed``, ``overwrite`` and ``model_factory``. Importing this module imports no
torch, so a plugin can declare its attacks at registration for free.

An attack that trains (fine-tuning, overwriting with the adversary's own
watermark) takes :data:`TRAIN_PARAMS` and :data:`DATA_PARAMS`: the thief's data
is a seeded ``fraction`` of the owner's digits training split (the owner's test
split stays unseen, so the accuracy an evaluation measures on it is honest), or
whatever ``data_factory`` returns (:func:`thief_data`).
"""

from __future__ import annotations

import abc
import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from auditor.bases import Attack, Param, parse_options
from auditor.errors import InputError, UsageError

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import TensorDataset

    from auditor.toolkit.recognise import Runnable
    from auditor.toolkit.training import TrainConfig

__all__ = [
    "COMMON",
    "DATA_PARAMS",
    "SUFFIXES",
    "TRAIN_PARAMS",
    "BuiltinAttack",
    "Param",
    "adversary_secret",
    "check_out",
    "require_same_function",
    "parse_options",
    "thief_data",
    "train_config",
]

#: The formats an attack writes, by the suffix of ``--out``.
SUFFIXES = (".safetensors", ".pt", ".onnx")

#: The options every built-in attack takes.
COMMON = (
    Param("seed", 0, "Seed of every random choice the attack makes.", int),
    Param("overwrite", False, "Replace an existing output file.", bool),
    Param("model_factory", None, "module:function building the model, when it is not a built-in architecture."),
)

#: The thief's data (:func:`thief_data`).
DATA_PARAMS = (
    Param("fraction", 0.5, "The thief's share of the owner's digits training split (0 to 1).", float),
    Param("data_factory", None, "module:function returning (train, test) TensorDatasets: the thief's own data."),
)
#: How an attack trains (:func:`train_config`).
TRAIN_PARAMS = (
    Param("epochs", 10, "Training epochs over the thief's data.", int),
    Param("lr", 1e-3, "Initial learning rate.", float),
    Param("optimizer", "sgd", "sgd (momentum 0.9), adam or adamw.", choices=("sgd", "adam", "adamw")),
    Param("weight_decay", 5e-4, "Weight decay (0.0005, the 'decay factor' of the papers' fine-tuning).", float),
    Param(
        "schedule",
        "constant",
        "Learning-rate schedule: constant, or cosine annealing to zero.",
        choices=("constant", "cosine"),
    ),
    Param("batch_size", 64, "Batch size.", int),
)


def check_out(model: Path, out: Path, *, overwrite: bool, suffixes: tuple[str, ...] = SUFFIXES) -> None:
    """Refuse an ``out`` that is the input (or inside an input folder), exists without ``overwrite``,
    is a folder, or has a suffix this attack does not write; create its folder."""
    suffix = out.suffix.lower()
    if suffix not in suffixes:
        shown = f"a {suffix} file" if suffix else "a file without a suffix"
        raise UsageError(f"{out}: cannot write {shown}; --out must end in {', '.join(suffixes)}")
    src, dst = model.resolve(), out.resolve()
    if dst == src:
        raise UsageError(f"{out}: --out is the input model; an attack never writes over its input")
    if src.is_dir() and src in dst.parents:
        raise UsageError(f"{out}: --out is inside the input model's folder; an attack never writes into its input")
    if out.exists() or out.is_symlink():
        if out.is_dir():
            raise UsageError(f"{out} is a folder; --out names the file to write")
        if model.exists() and os.path.samefile(out, model):
            raise UsageError(f"{out}: --out is the input model; an attack never writes over its input")
        if not overwrite:
            raise UsageError(f"{out} already exists; choose another --out or --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)


class BuiltinAttack(Attack):
    """An attack with declared options (:data:`params`) and the shared output checks."""

    #: The attack's own options (:data:`COMMON` are added).
    params: ClassVar[tuple[Param, ...]] = ()
    #: The ``--out`` suffixes it writes.
    suffixes: ClassVar[tuple[str, ...]] = SUFFIXES
    #: One line for ``auditor attack --list``: which paper measurement it reproduces.
    paper: ClassVar[str] = ""

    @classmethod
    def all_params(cls) -> tuple[Param, ...]:
        """The attack's options followed by the common ones."""
        return cls.params + COMMON

    def apply(self, model: Path, out: Path, *, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check the options and ``out``, run the attack, and return its summary (JSON-ready)."""
        values = parse_options(self.id, self.all_params(), options)
        model, out = Path(model), Path(out)
        if not model.exists():
            raise InputError(model, "no such file or folder")
        check_out(model, out, overwrite=bool(values["overwrite"]), suffixes=self.suffixes)
        started = time.perf_counter()
        summary = self.run(model, out, values)
        return {
            "attack": self.id, "function_preserving": self.function_preserving, "input": str(model),
            "out": str(out), "options": {k: v for k, v in values.items() if k != "overwrite"},
            **summary, "seconds": round(time.perf_counter() - started, 3),
        }  # fmt: skip

    @abc.abstractmethod
    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Write the attacked ``model`` to ``out``; return what was done (JSON-ready)."""


def require_same_function(model: Path, found: Runnable, edited: nn.Module, *, seed: int, tolerance: float) -> float:
    """The largest output change of ``edited`` against the model ``found`` was built as, on 64 seeded inputs of
    the model's own shape and dtype (:func:`auditor.toolkit.models.random_input`: token ids for a model that
    takes them); raises :class:`UsageError` ("not written") when it exceeds ``tolerance``."""
    import torch

    from auditor.toolkit.models import random_input

    x = random_input(found.module, found.input_shape, found.input_dtype, seed=seed)
    with torch.no_grad():
        change = float((found.module.eval()(x) - edited.eval()(x)).abs().max())
    if not change <= tolerance:  # a NaN is a change too
        raise UsageError(f"{model}: the edit changed the outputs by {change:.3g} (over {tolerance:g}): not written")
    return change


def thief_data(options: Mapping[str, Any]) -> TensorDataset:
    """The thief's training data from the :data:`DATA_PARAMS` and ``seed`` options (see the module docstring)."""
    from auditor.toolkit import data as datasets

    if options["data_factory"]:
        return datasets.owner_dataset(options["data_factory"]).train
    fraction = options["fraction"]
    if fraction >= 1.0:
        return datasets.digits().train
    return datasets.split(datasets.digits(), fraction, seed=options["seed"])[0]


def train_config(options: Mapping[str, Any]) -> TrainConfig:
    """The training loop's settings from the :data:`TRAIN_PARAMS` and ``seed`` options, on the CPU."""
    from auditor.toolkit.training import TrainConfig

    return TrainConfig(
        epochs=options["epochs"], batch_size=options["batch_size"], lr=options["lr"], optimizer=options["optimizer"],
        weight_decay=options["weight_decay"], seed=options["seed"], schedule=options["schedule"], device="cpu",
    )  # fmt: skip


def adversary_secret(seed: int) -> bytes:
    """32 bytes the adversary's keys are derived from, fixed by ``seed`` so that an attack repeats."""
    return hashlib.sha256(f"adversary {seed}".encode()).digest()
