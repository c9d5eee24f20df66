"""Base classes of the plugin kinds, the one option schema (:class:`Param`) and the presentation contract.

Each kind is a small class with metadata attributes and one abstract method.
Plugins subclass one and hand an instance to the ``register`` callback of the
matching hook. Construction must be cheap: heavy work (importing big
libraries, reading files, training) happens on first use, never at import or
registration.

Detectors and restorers also describe how the evidence report and the
command line show them (:class:`Presentable`): the report and the CLI only ask
the registered component, so a third-party detector is shown as richly as a
built-in one.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from auditor.findings import Finding
    from auditor.graph import LayerGraph

__all__ = [
    "Attack",
    "Detector",
    "Embedder",
    "Format",
    "Param",
    "PluginComponent",
    "Presentable",
    "Restorer",
    "parse_options",
]

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One option of a component (detector, restorer, embedder or attack).

    ``kind`` is the value's type (``bool``, ``int``, ``float``, ``str`` or
    ``Path``); a ``None`` default means the option is optional. ``choices``
    limits a string; ``minimum`` and ``maximum`` bound a number (``open``: the
    bounds themselves are refused). ``aliases`` are documented command-line
    spellings (``--p-threshold``) that set this option on ``auditor audit``.
    """

    name: str
    default: Any
    help: str
    kind: type = str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    open: bool = False
    aliases: tuple[str, ...] = ()

    def convert(self, value: Any, owner: str) -> Any:
        """``value`` as this option's type; a :class:`~auditor.errors.UsageError` naming ``owner`` and the
        option if it is not one (text from a command line and Python values alike)."""
        from auditor.errors import UsageError

        if value is None:
            return None
        bad = UsageError(f"{owner}: option {self.name} must be {self.expected()}, not {value!r}")
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in _TRUE | _FALSE:
                raise bad
            return text in _TRUE
        try:
            if self.kind is int and not isinstance(value, bool):
                if isinstance(value, float) and not value.is_integer():
                    raise bad
                converted: Any = int(value)
            elif self.kind is float and not isinstance(value, bool):
                converted = float(value)
            elif self.kind is str:
                converted = str(value)
            elif self.kind is Path:
                converted = Path(value)
            else:
                raise bad
        except (TypeError, ValueError):
            raise bad from None
        if self.choices and converted not in self.choices:
            raise bad
        if self.kind in (int, float) and not self._in_range(converted):
            raise bad
        return converted

    def _in_range(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        low_ok = self.minimum is None or (x > self.minimum if self.open else x >= self.minimum)
        high_ok = self.maximum is None or (x < self.maximum if self.open else x <= self.maximum)
        return low_ok and high_ok

    def expected(self) -> str:
        """What a valid value is, in words (for error messages and ``--help``)."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        what = {bool: "true or false", int: "an integer", float: "a number", Path: "a path"}.get(self.kind, "text")
        if self.minimum is not None and self.maximum is not None:
            sign = "strictly " if self.open else ""
            return f"{what} {sign}between {self.minimum:g} and {self.maximum:g}"
        if self.minimum is not None:
            return f"{what} {'>' if self.open else '>='} {self.minimum:g}"
        if self.maximum is not None:
            return f"{what} {'<' if self.open else '<='} {self.maximum:g}"
        return what


def parse_options(owner: str, params: tuple[Param, ...], options: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with ``options`` (``-`` and ``_`` alike in names), each converted; an unknown name
    is a :class:`~auditor.errors.UsageError` that lists the options ``owner`` has."""
    from auditor.errors import UsageError

    by_name = {p.name: p for p in params}
    values = {p.name: p.default for p in params}
    for raw, value in options.items():
        name = str(raw).replace("-", "_")
        if name not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            raise UsageError(f"{owner} has no option {raw!r}; its options: {known}")
        values[name] = by_name[name].convert(value, owner)
    return values


class PluginComponent(abc.ABC):
    """What every registered component has: an id, a one-line description and its options."""

    #: Unique id within its kind, lower-case with dashes (``my-scheme``).
    id: ClassVar[str] = ""
    #: One line shown by ``auditor plugins``.
    description: ClassVar[str] = ""
    #: The component's options, in the order ``--help`` and the docs list them.
    params: ClassVar[tuple[Param, ...]] = ()

    def options(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every option's value: the defaults overlaid with ``given``, validated."""
        return parse_options(self.id, self.params, given or {})


class Presentable(PluginComponent):
    """How the report and the command line show a component's results (detectors and restorers).

    Everything here has a plain default, so a component that declares nothing
    is still shown: its summary sentence, every metric by its key, every
    detail (checked by the secret guard) and a generic explanation.
    """

    #: The name a reader sees (``My Scheme``); the id where empty.
    title: ClassVar[str] = ""
    #: What the numbers mean and what they do not prove, in plain words (one paragraph).
    explanation: ClassVar[str] = ""
    #: Metric key -> reader-facing label, in the order the report lists them: the deciding number first.
    #: Metrics not named here follow in key order, labelled by their key.
    metric_labels: ClassVar[Mapping[str, str]] = {}
    #: The ``details`` keys a report may carry; ``None``: all of them (each still checked by the guard).
    public_details: ClassVar[tuple[str, ...] | None] = None
    #: Column order of the tables in ``details`` (details key -> columns); others put ``name`` first.
    columns: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    #: Metric keys shown as percentages.
    percent_metrics: ClassVar[tuple[str, ...]] = ()

    @property
    def display_name(self) -> str:
        """:attr:`title`, or the id where there is none."""
        return self.title or self.id

    def public(self, details: Mapping[str, Any]) -> dict[str, Any]:
        """The part of a result's ``details`` a report may hold (default: the :attr:`public_details` keys)."""
        if self.public_details is None:
            return dict(details)
        return {k: v for k, v in details.items() if k in self.public_details}

    def figure(self, entry: Mapping[str, Any]) -> tuple[str, str] | None:
        """A picture of one result as the report holds it (a finding or a restore log entry, JSON data):
        ``(caption, svg_markup)``, or ``None`` for no picture. The markup must be a self-contained ``<svg>``
        with every piece of text escaped, no script and no external resource (:mod:`auditor.toolkit.figures`
        draws such charts); the report refuses anything else."""
        return None

    def headline(self, entry: Mapping[str, Any]) -> str:
        """One line for a terminal or a summary table (default: the result's summary sentence)."""
        return str(entry.get("summary", ""))


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


class Detector(Presentable):
    """Looks for one watermark scheme in a suspect.

    ``scheme`` names the owner-bundle scheme it reads (``my-scheme``), or
    is empty for a detector that needs no bundle and runs on every audit.
    """

    scheme: ClassVar[str] = ""
    #: A short name for narrow columns and plot legends (``GR``); :attr:`title` where empty.
    short_title: ClassVar[str] = ""
    #: What a robustness table shows of a finding: ``(metric key, words)`` of the measure of how much of the
    #: watermark is left (a rate, an accuracy), the key of its log10 p-value, and further metrics by the
    #: row key they are shown under.
    measure: ClassVar[tuple[str, str]] = ("", "")
    p_metric: ClassVar[str] = ""
    table_metrics: ClassVar[Mapping[str, str]] = {}
    #: The null hypothesis the deciding p-value (:attr:`p_metric`) is computed under, in plain words
    #: ("the suspect's ... are unrelated to the owner's ..."); the report's first screen shows it.
    null_hypothesis: ClassVar[str] = ""
    #: What a finding of this detector does not prove, in a sentence or two, for the first screen
    #: (:attr:`explanation` says it at length further down).
    limitations: ClassVar[str] = ""
    #: The question a bundle-free detector's findings answer, when it is not a watermark's: a few words read as
    #: "<evidence>: yes / no / untested" ("derived from the reference"). The report shows such a finding beside
    #: the verdict as a separate line of evidence and never as a watermark found or not; like every bundle-free
    #: finding it leaves the verdict and the exit code alone. Empty (the default): a watermark check.
    evidence: ClassVar[str] = ""

    @abc.abstractmethod
    def detect(self, suspect: LayerGraph, *, bundle: Any | None, context: Mapping[str, Any]) -> list[Finding]:
        """Findings for ``suspect`` against ``bundle`` (``None`` when ``scheme`` is
        empty). ``context["options"]`` holds this detector's options, validated
        against :attr:`params` (:meth:`settings` reads them with the defaults);
        ``context["reference"]`` the reference model's graph (``None`` without
        ``--reference``) and ``context["restore"]`` the restore stage's log, whose
        ``status: ok`` entries changed ``suspect``.
        Exceptions are caught by the core and become an error finding."""

    def settings(self, context: Mapping[str, Any]) -> dict[str, Any]:
        """This detector's option values for an audit: the defaults overlaid with ``context["options"]``."""
        given = context.get("options") if isinstance(context, Mapping) else None
        return self.options(given if isinstance(given, Mapping) else {})

    def shipped_calibration(self, payload: Mapping[str, Any]) -> Path | None:
        """A calibration file (``auditor calibrate``'s output) shipped with this detector that fits an owner
        bundle with this ``payload`` (of its scheme): the null distribution of :attr:`p_metric` measured on
        independent models of the architecture, data and recipe the bundle names. The report shows its
        measured false-positive rate beside the finding unless the analyst gives one (``--calibration``).
        Default: none."""
        return None

    def validate_bundle(self, payload: Mapping[str, Any]) -> None:
        """Check an owner bundle's ``payload`` (of this scheme) against the scheme's schema before any suspect
        is read: the type, range, length and encoding of every field :meth:`detect` reads, and bounds that keep
        its work proportional to the suspect. Raise :class:`~auditor.errors.BundleFieldError` (the field's path
        and why) or ``ValueError``: the core reports it as one line naming the bundle file, exit code 4, where
        :meth:`detect` failing would give a "detector failed" finding. The default accepts any payload."""
        return None

    def bundle_summary(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """What a report may show of an owner bundle's ``payload`` (of this scheme) beyond its file, hash and
        scheme, named field by field (never "everything but the secrets"); merged into the report's bundle entry."""
        return {}

    def first_screen(self, entry: Mapping[str, Any], bundle_entry: Mapping[str, Any] | None) -> dict[str, Any]:
        """What the report's first screen says of one finding (``entry``, as the report holds it) made with
        the owner bundle described by ``bundle_entry`` (the report's entry for it, ``None`` for a bundle-free
        check). Every key is optional; the report fills in plain defaults for the ones left out:

        * ``owner``: whose watermark, the owner identity the bundle proves, in full;
        * ``owner_basis``: why the report may name that owner (what was verified, or what holding the
          bundle means);
        * ``statistic``: the deciding statistic in words, with its value;
        * ``log10_p``: the exact log10 of its tail bound under the null (``None`` where there is none);
        * ``p_label``: what that tail bound is (the test, the correction);
        * ``null_hypothesis``: the null, in plain words;
        * ``not_proven``: what the finding does not prove.

        The default gives :attr:`null_hypothesis`, :attr:`limitations` and the :attr:`p_metric` value."""
        metrics = entry.get("metrics")
        log10 = metrics.get(self.p_metric) if isinstance(metrics, Mapping) and self.p_metric else None
        return {"log10_p": log10, "null_hypothesis": self.null_hypothesis, "not_proven": self.limitations}

    def describes(self, payload: Mapping[str, Any], graph: LayerGraph) -> str | None:
        """Whether an owner bundle's ``payload`` (of this scheme) describes the architecture of ``graph``, the
        reference model given for the restore stage: ``None`` when it does (or this detector cannot tell), else
        why not, in words ("it has no layer like the watermarked conv2 [32, 16, 3, 3]"). The report states
        a reason at its top and says that the restore evidence rests on an unverified reference."""
        return None


class Restorer(Presentable):
    """Undoes a function-preserving edit of a suspect against the owner's reference."""

    #: Restorers run in ascending order (channel order before scale: docs/design/restore.md).
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

    #: Where an option's value in :attr:`grid` is this, ``auditor evaluate`` puts the path of the audited
    #: owner bundle of the attack's :attr:`scheme` there (and leaves the cell out when there is none).
    BUNDLE: ClassVar[str] = "{bundle}"
    #: True when the attack keeps the model's function (outputs within 1e-4).
    function_preserving: ClassVar[bool] = False
    #: The owner-bundle scheme the attack targets (a forgery, an overwriting); empty for any model.
    scheme: ClassVar[str] = ""
    #: The cells this attack adds to ``auditor evaluate``'s robustness grid: each a mapping with ``label``,
    #: ``group`` (``overwriting``, ``forging``...) and ``options``, and optionally ``series`` and ``strength``.
    grid: ClassVar[tuple[Mapping[str, Any], ...]] = ()

    @abc.abstractmethod
    def apply(self, model: Path, out: Path, *, options: Mapping[str, Any]) -> dict[str, Any]:
        """Write the attacked model to ``out`` (never touching ``model``); return what was done."""
