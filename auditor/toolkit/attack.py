"""What every built-in attack shares: declared options, their parsing, and the output checks.

An attack declares its options as :class:`Param` rows (name, default, help,
allowed values); :meth:`BuiltinAttack.apply` converts the values it is given
(strings from the command line, or Python values), refuses unknown names,
checks ``out`` (:func:`~.model_io.check_out`) and then calls ``run``. Every
attack takes ``seed``, ``overwrite`` and ``model_factory``.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from auditor.bases import Attack, Param, parse_options
from auditor.errors import InputError
from auditor.toolkit.modelio import SUFFIXES, check_out

__all__ = ["COMMON", "BuiltinAttack", "Param", "parse_options"]

#: The options every built-in attack takes.
COMMON = (
    Param("seed", 0, "Seed of every random choice the attack makes.", int),
    Param("overwrite", False, "Replace an existing output file.", bool),
    Param("model_factory", None, "module:function building the model, when it is not a built-in architecture."),
)


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
