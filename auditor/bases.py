"""Base classes of the plugin kinds.

Each kind is a small class with metadata attributes and one abstract method.
Plugins subclass one and hand an instance to the ``register`` callback of the
matching hook. Construction must be cheap: heavy work (importing big
libraries, reading files, training) happens on first use, never at import or
registration.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from auditor.findings import Finding
    from auditor.graph import LayerGraph

__all__ = ["Attack", "Detector", "Embedder", "Format", "PluginComponent", "Restorer"]


class PluginComponent(abc.ABC):
    """What every registered component has: an id and a one-line description."""

    #: Unique id within its kind, lower-case with dashes (``greedy-residuals``).
    id: ClassVar[str] = ""
    #: One line shown by ``auditor plugins``.
    description: ClassVar[str] = ""


class Format(PluginComponent):
    """A model file format that loads into a :class:`~auditor.graph.LayerGraph`.

    ``sniff`` decides from content, never from the file name. ``priority``
    orders formats whose sniffs could both match (higher is tried first).
    """

    priority: ClassVar[int] = 0

    @abc.abstractmethod
    def sniff(self, path: Path, head: bytes) -> bool:
        """Whether ``path`` is in this format, from ``head`` (its first 64 bytes;
        empty for a folder) and, if need be, a cheap look at the file. Must not
        raise on arbitrary input."""

    @abc.abstractmethod
    def load(self, path: Path) -> LayerGraph:
        """Read ``path`` into a layer graph without running anything in it.

        Raises :class:`~auditor.errors.InputError` for a broken file and
        :class:`~auditor.errors.UnsafeInputError` for one that is refused."""


class Detector(PluginComponent):
    """Looks for one watermark scheme in a suspect.

    ``scheme`` names the owner-bundle scheme it reads (``greedy-residuals``), or
    is empty for a detector that needs no bundle and runs on every audit.
    """

    scheme: ClassVar[str] = ""

    @abc.abstractmethod
    def detect(self, suspect: LayerGraph, *, bundle: Any | None, context: Mapping[str, Any]) -> list[Finding]:
        """Findings for ``suspect`` against ``bundle`` (``None`` when ``scheme`` is
        empty). ``context`` carries audit-wide settings (thresholds, the
        reference model). Exceptions are caught by the core and become an
        error finding."""


class Restorer(PluginComponent):
    """Undoes a function-preserving edit of a suspect against the owner's reference."""

    #: Restorers run in ascending order (order before scale, see shared/specs/restore.md).
    order: ClassVar[int] = 100

    @abc.abstractmethod
    def restore(self, suspect: LayerGraph, reference: LayerGraph) -> tuple[LayerGraph, dict[str, Any]]:
        """The restored suspect (a new graph; the input is left alone) and a log for the report."""


class Embedder(PluginComponent):
    """Trains (or marks) an owner's model with a watermark."""

    @abc.abstractmethod
    def embed(self, *, out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        """Write the watermarked model and the owner bundle under ``out_dir``;
        return a summary (paths written, accuracy, detection rate)."""


class Attack(PluginComponent):
    """A removal or ambiguity attack on a model file."""

    #: True when the attack keeps the model's function (outputs within 1e-4).
    function_preserving: ClassVar[bool] = False

    @abc.abstractmethod
    def apply(self, model: Path, out: Path, *, options: Mapping[str, Any]) -> dict[str, Any]:
        """Write the attacked model to ``out`` (never touching ``model``); return what was done."""
