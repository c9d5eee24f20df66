"""What the report asks of the component behind a result: its name, words, labels, columns and figure.

The report names no scheme: for each finding it looks up the registered
detector by id (for each restore log entry, the restorer) and asks it through
the presentation contract (:class:`auditor.bases.Presentable`). A result whose
component is not installed any more, or the core's own findings, are shown
with the plain defaults. A figure is embedded only if it is a self-contained
SVG with no script, no event handler and no external reference.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

from auditor.bases import Detector, Presentable
from auditor.report import text

__all__ = ["CORE_BUNDLE_KEYS", "FIRST_SCREEN_TEXT", "ComponentView", "safe_svg", "view_for_scheme", "view_of"]

#: The fields of a report's bundle entry the core writes; the rest come from the scheme's detector.
CORE_BUNDLE_KEYS = ("name", "path", "sha256", "scheme", "version", "secret", "released_model")
_UNSAFE = re.compile(
    r"<\s*(script|foreignobject|iframe|object|embed|image|use|style|link|meta)\b|javascript:|\bon[a-z]+\s*=|"
    r"\bhref\s*=|url\s*\(|@import",
    re.IGNORECASE,
)


def safe_svg(markup: Any) -> Markup | None:
    """``markup`` as Markup if it is one or more plain ``<svg>`` elements, else ``None`` (refused)."""
    if not isinstance(markup, str):
        return None
    s = str(markup).strip()
    if not (s.startswith("<svg") and s.endswith("</svg>")) or _UNSAFE.search(s):
        return None
    return Markup(s)  # noqa: S704 (checked above: only SVG, no script, no handler, no external reference)


#: The first screen's text fields (:meth:`auditor.bases.Detector.first_screen`); ``log10_p`` is its one number.
FIRST_SCREEN_TEXT = ("owner", "owner_basis", "statistic", "p_label", "null_hypothesis", "not_proven")


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    return float(value) if ok else None


@dataclass(frozen=True)
class ComponentView:
    """One component's presentation, with the defaults for what it does not declare."""

    kind: str
    id: str
    component: Presentable | None

    @property
    def title(self) -> str:
        """The component's name for a reader."""
        return self.component.display_name if self.component is not None else self.id

    def explanation(self, verdict: str = "") -> str:
        """The paragraph that says what the numbers mean and do not prove."""
        if verdict == "error":
            return text.ERROR_EXPLANATION
        if self.kind == "detectors" and self.id == "core":
            return text.CORE_EXPLANATION
        if self.component is not None and self.component.explanation:
            return self.component.explanation
        return text.generic_explanation(self.kind, self.id)

    def label(self, key: str) -> str:
        """A metric's or column's reader-facing name."""
        labels = self.component.metric_labels if self.component is not None else {}
        return labels.get(key) or text.label(key)

    def metric_items(self, metrics: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """``metrics`` in the component's order (the deciding number first), the rest by key."""
        order = list(self.component.metric_labels) if self.component is not None else []
        known = [k for k in order if k in metrics]
        return [(k, metrics[k]) for k in known] + [(k, v) for k, v in sorted(metrics.items()) if k not in known]

    def fmt(self, value: Any, key: str = "") -> str:
        """``value`` as the report writes it, as a percentage where the component says so."""
        percent = self.component is not None and key in self.component.percent_metrics
        return text.fmt(value, key, percent=percent)

    def metric_text(self, key: str, metrics: Mapping[str, Any]) -> str:
        """Metric ``key`` of ``metrics`` as the report writes it. A probability with its exact log10 beside it
        (``log10_<key>``) is written from the log10, as a power of ten when tiny, so that one too small for a
        float (stored as ``null``) is still shown, and never as 0."""
        value, log10 = metrics.get(key), _number(metrics.get(f"log10_{key}"))
        if log10 is not None and (value is None or (isinstance(value, float) and log10 < -3)):
            return text.power_of_ten(log10)
        return self.fmt(value, key)

    def first_screen(self, entry: Mapping[str, Any], bundle_entry: Mapping[str, Any] | None) -> dict[str, Any]:
        """What the first screen says of ``entry`` (:meth:`auditor.bases.Detector.first_screen`), every field
        there: the detector's words where it gives them as text, plain defaults elsewhere; a detector that
        fails or answers something else gets the defaults."""
        given: Mapping[str, Any] = {}
        if isinstance(self.component, Detector) and entry.get("verdict") != "error":
            with contextlib.suppress(Exception):  # a broken first screen must not lose the report
                answer = self.component.first_screen(entry, bundle_entry)
                given = answer if isinstance(answer, Mapping) else {}
        shown: dict[str, Any] = {
            k: " ".join(v.split()) for k in FIRST_SCREEN_TEXT if isinstance(v := given.get(k), str) and v.strip()
        }
        shown["log10_p"] = _number(given.get("log10_p"))
        raw = entry.get("metrics")
        metrics: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        if "owner" not in shown:
            shown["owner"] = (
                f"the holder of owner bundle {bundle_entry.get('name')} (SHA-256 {bundle_entry.get('sha256')})"
                if bundle_entry else "no owner: this check reads no owner bundle"
            )  # fmt: skip
        if "statistic" not in shown:
            declared = list(self.component.metric_labels) if self.component is not None else []
            first = next((k for k in declared if k in metrics), None)
            shown["statistic"] = (
                f"{self.label(first)}: {self.metric_text(first, metrics)}" if first else self.headline(entry)
            )
        if shown["log10_p"] is not None and "p_label" not in shown:
            p_key = self.component.p_metric if isinstance(self.component, Detector) else ""
            shown["p_label"] = self.label(p_key.removeprefix("log10_")) if p_key else "p-value"
        shown.setdefault("null_hypothesis", text.GENERIC_NULL)
        shown.setdefault("not_proven", text.GENERIC_LIMITS)
        shown.setdefault("owner_basis", "")
        shown.setdefault("p_label", "")
        return {k: shown[k] for k in sorted(shown)}

    def evidence(self, entry: Mapping[str, Any]) -> dict[str, str] | None:
        """The separate line of evidence a finding (as the report holds it) gives: its detector's question and
        the answer (:func:`auditor.audit.detect.evidence_answer`), or ``None`` for a watermark finding."""
        from auditor.audit.detect import evidence_answer
        from auditor.findings import Finding, Verdict

        try:
            finding = Finding(detector=str(entry.get("detector")), verdict=Verdict(entry.get("verdict")),
                              summary="", scheme=str(entry.get("scheme") or ""))  # fmt: skip
        except ValueError:
            return None
        return evidence_answer(finding, self.component if isinstance(self.component, Detector) else None)

    def columns(self, key: str, rows: list[Any], limit: int = 10) -> tuple[list[str], bool]:
        """The columns of a details table ``key`` (the component's order first) and whether some were cut."""
        order = self.component.columns.get(key, ()) if self.component is not None else ()
        return text.columns(order, rows, limit)

    def headline(self, entry: Mapping[str, Any]) -> str:
        """The component's one line for ``entry`` (its summary sentence when it declares none or fails)."""
        if self.component is not None:
            with contextlib.suppress(Exception):  # a broken headline must not lose the line
                return str(self.component.headline(entry))
        return str(entry.get("summary", ""))

    def figure(self, entry: Mapping[str, Any]) -> tuple[str, Markup] | None:
        """The component's picture of ``entry`` (caption, SVG), or ``None``; a failing or unsafe one is dropped."""
        if self.component is None:
            return None
        try:
            drawn = self.component.figure(entry)
        except Exception:  # a broken figure must not lose the report; the numbers are all there
            return None
        if not isinstance(drawn, tuple) or len(drawn) != 2:
            return None
        picture = safe_svg(drawn[1])
        return (str(drawn[0]), picture) if picture is not None else None


def view_of(kind: str, component_id: str) -> ComponentView:
    """The view of the registered ``kind`` (``detectors`` or ``restorers``) component ``component_id``."""
    from auditor.plugin_manager import registered

    reg = registered(kind).get(component_id)
    component = reg.component if reg is not None and isinstance(reg.component, Presentable) else None
    return ComponentView(kind, component_id, component)


def view_for_scheme(scheme: str) -> ComponentView:
    """The view of the first detector (by id) that reads owner bundles of ``scheme``."""
    from auditor.bases import Detector
    from auditor.plugin_manager import components

    reader = next((d for d in components("detectors", Detector) if scheme and d.scheme == scheme), None)
    return ComponentView("detectors", reader.id if reader is not None else scheme, reader)
