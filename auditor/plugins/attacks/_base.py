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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from auditor.bases import Attack
from auditor.errors import InputError, UsageError
from auditor.plugins.attacks.model_io import SUFFIXES, check_out

__all__ = ["COMMON", "BuiltinAttack", "Param", "parse_options"]

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One option of an attack. ``kind`` is the value's type (``bool``, ``int``, ``float``, ``str``);
    a ``None`` default means optional. ``choices`` limits a string."""

    name: str
    default: Any
    help: str
    kind: type = str
    choices: tuple[str, ...] = ()

    def convert(self, value: Any, attack: str) -> Any:
        """``value`` as this option's type; UsageError naming the option if it is not one."""
        if value is None:
            return None
        bad = UsageError(f"{attack}: option {self.name} must be {self._what()}, not {value!r}")
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in _TRUE | _FALSE:
                raise bad
            return text in _TRUE
        try:
            if self.kind is int and not isinstance(value, bool):
                converted: Any = int(value)
            elif self.kind is float and not isinstance(value, bool):
                converted = float(value)
            elif self.kind is str:
                converted = str(value)
            else:
                raise bad
        except (TypeError, ValueError):
            raise bad from None
        if self.choices and converted not in self.choices:
            raise bad
        return converted

    def _what(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return {bool: "true or false", int: "an integer", float: "a number"}.get(self.kind, "text")


#: The options every built-in attack takes.
COMMON = (
    Param("seed", 0, "Seed of every random choice the attack makes.", int),
    Param("overwrite", False, "Replace an existing output file.", bool),
    Param("model_factory", None, "module:function building the model, when it is not a built-in architecture."),
)


def parse_options(attack: str, params: tuple[Param, ...], options: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with ``options`` (``-`` and ``_`` alike in names), each converted."""
    by_name = {p.name: p for p in params}
    values = {p.name: p.default for p in params}
    for raw, value in options.items():
        name = str(raw).replace("-", "_")
        if name not in by_name:
            raise UsageError(f"{attack} has no option {raw!r}; its options: {', '.join(sorted(by_name))}")
        values[name] = by_name[name].convert(value, attack)
    return values


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
