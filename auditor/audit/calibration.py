"""Known error rates: the calibration file, the exact bound on a measured false-positive rate, and what a
report says of a finding that a calibration applies to.

A calibration (``auditor calibrate``, :mod:`auditor.audit.calibrate`) is the null distribution of each
detector's deciding statistic, measured on models known to be independent of the owner's, against one owner
bundle. The deciding statistic is the one the detector's contract names (:attr:`auditor.bases.Detector.p_metric`,
the log10 of its tail bound: lower is stronger evidence). Its false-positive rate is the share of those models
the detector called "detected", with an exact one-sided Clopper-Pearson upper bound (0 of 60: below 4.9% at
95% confidence). docs/calibration.md says what the number means and what it does not.

A calibration file handed to auditor is hostile like any other input: its size is capped before it is read
and every way it can be malformed is one :class:`~auditor.errors.InputError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.errors import InputError, UsageError
from auditor.jsondata import DuplicateKeyError, dump_json, jsonable, unique_keys

if TYPE_CHECKING:
    from auditor.bundle import OwnerBundle
    from auditor.findings import Finding

__all__ = [
    "CALIBRATION_FORMAT",
    "CALIBRATION_VERSION",
    "CONFIDENCE",
    "MAX_CALIBRATION_BYTES",
    "Calibration",
    "binomial_cdf",
    "clopper_pearson_upper",
    "error_rate",
    "error_rates",
    "load_calibration",
    "null_values",
    "write_calibration",
]

CALIBRATION_FORMAT = "auditor-calibration"
CALIBRATION_VERSION = 1
#: A calibration of thousands of models is a few hundred kilobytes.
MAX_CALIBRATION_BYTES = 16 << 20
MAX_CONTAINERS = 1_000_000
#: The confidence of the bound a report gives on a measured false-positive rate.
CONFIDENCE = 0.95
METHOD = "Clopper-Pearson (exact binomial), one-sided"
VERDICTS = ("detected", "not-detected", "inconclusive", "error")
_MAX_TEXT = 2000
_HEX = frozenset("0123456789abcdef")


# --- the bound ------------------------------------------------------------------------------------------


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (no term underflows to a wrong total)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    logs = [
        math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_p + (n - j) * log_q
        for j in range(k + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


def clopper_pearson_upper(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """The exact one-sided upper confidence bound on a rate of which ``k`` of ``n`` trials came out positive:
    the largest rate under which ``k`` or fewer positives still have probability ``1 - confidence`` (the
    ``confidence`` quantile of Beta(k + 1, n - k)); 1 when every trial was positive.

    0 of 60 at 95%: 1 - 0.05^(1/60) = 0.0487."""
    if isinstance(k, bool) or isinstance(n, bool) or not (isinstance(k, int) and isinstance(n, int)):
        raise TypeError("k and n must be integers")
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, not k={k}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"the confidence must be strictly between 0 and 1, not {confidence}")
    alpha = 1.0 - confidence
    if k == n:
        return 1.0
    if k == 0:
        return -math.expm1(math.log(alpha) / n)
    low, high = 0.0, 1.0  # binomial_cdf(k, n, p) falls from 1 to 0 as p rises: bisect for alpha
    for _ in range(200):
        mid = (low + high) / 2
        if mid in (low, high):
            break
        if binomial_cdf(k, n, mid) > alpha:
            low = mid
        else:
            high = mid
    return high


def error_rate(verdicts: Sequence[str], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The measured false-positive rate of a detector on independent models from its ``verdicts``:
    ``false_positives`` ("detected") of ``decided`` (every verdict but "error"), the rate and its upper bound."""
    decided = sum(v != "error" for v in verdicts)
    k = sum(v == "detected" for v in verdicts)
    return {
        "false_positives": k, "decided": decided, "errors": len(verdicts) - decided,
        "rate": k / decided if decided else None,
        "upper_bound": clopper_pearson_upper(k, decided, confidence) if decided else None,
        "confidence": confidence, "method": METHOD,
    }  # fmt: skip


# --- the file ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """A calibration as read from its file: the document, the file's SHA-256 and where it came from
    (``shipped``: a built-in detector's own, found through :meth:`~auditor.bases.Detector.shipped_calibration`)."""

    document: dict[str, Any]
    sha256: str
    path: Path | None = None
    shipped: bool = False

    @property
    def name(self) -> str:
        """The calibration set's name (its file name where it has none)."""
        return str(self.document.get("name") or (self.path.name if self.path else ""))

    def entry(self, detector_id: str, scheme: str) -> dict[str, Any] | None:
        """The null distribution this calibration holds for ``detector_id`` reading bundles of ``scheme``."""
        for entry in self.document["detectors"]:
            if entry["detector"] == detector_id and entry["scheme"] == scheme:
                return dict(entry)
        return None

    def source(self) -> dict[str, Any]:
        """What a report says of the calibration set: its name and file, how its models were made, against
        which owner bundle and reference, and the command that made it."""
        doc = self.document
        made = doc["made"]
        return {
            "name": self.name, "file": self.path.name if self.path else None,
            "path": str(self.path) if self.path and not self.shipped else None, "sha256": self.sha256,
            "shipped": self.shipped, "models": len(doc["models"]), "how": made.get("how"),
            "description": made.get("description"), "command": doc.get("command"),
            "bundle_sha256": doc["bundle"]["sha256"], "bundle_name": doc["bundle"].get("name"),
            "reference_sha256": (doc.get("reference") or {}).get("sha256"),
        }  # fmt: skip


def write_calibration(document: Mapping[str, Any], path: Path) -> str:
    """Check ``document`` as a calibration (as if it were read back), write it to ``path`` whole or not at all;
    its SHA-256."""
    from auditor.safeio import write_atomically

    data = dump_json(jsonable(document))
    _check(path, json.loads(data))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the calibration: {exc.strerror or exc}") from None
    return hashlib.sha256(data).hexdigest()


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def load_calibration(path: Path, *, shipped: bool = False) -> Calibration:
    """Read and check a calibration file; raises :class:`~auditor.errors.InputError` naming ``path`` for a
    missing, oversized or malformed one, a newer version, or counts that do not match its verdicts."""
    from auditor.safeio import read_small_file

    path = Path(path)
    data = read_small_file(path, limit=MAX_CALIBRATION_BYTES, what="a calibration")
    if not data.strip():
        raise InputError(path, "the file is empty")
    if data.count(b"[") + data.count(b"{") > MAX_CONTAINERS:
        raise InputError(path, f"not a calibration: more than {MAX_CONTAINERS:,d} objects and lists")
    try:
        document = json.loads(
            data.decode("utf-8"), object_pairs_hook=unique_keys, parse_constant=_refuse_constant, parse_float=_finite
        )
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text (bad byte at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except DuplicateKeyError as exc:
        raise InputError(path, f"not valid JSON for auditor: the key {exc.key[:60]!r} appears twice") from None
    except RecursionError:
        raise InputError(path, "not a calibration: nested too deeply") from None
    except ValueError as exc:
        raise InputError(path, f"not valid JSON for auditor: {exc}") from None
    _check(path, document)
    return Calibration(document, hashlib.sha256(data).hexdigest(), path, shipped)


def _text(value: Any, limit: int = _MAX_TEXT) -> bool:
    return isinstance(value, str) and len(value) <= limit


def _sha(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _check(path: Path, doc: Any) -> None:
    def bad(problem: str) -> InputError:
        return InputError(path, f"not a valid calibration: {problem}")

    if not isinstance(doc, dict):
        raise bad("the top level is not an object")
    if doc.get("calibration_format") != CALIBRATION_FORMAT:
        raise bad(f'its "calibration_format" is not "{CALIBRATION_FORMAT}"')
    version = doc.get("calibration_version")
    if type(version) is not int or version < 1:
        raise bad('"calibration_version" must be a positive integer')
    if version > CALIBRATION_VERSION:
        raise InputError(path, f"calibration version {version} was made by a newer auditor: upgrade auditor")
    if not _text(doc.get("name", ""), 200) or not _text(doc.get("command", "")):
        raise bad('"name" and "command" must be short strings')
    made, bundle, reference = doc.get("made"), doc.get("bundle"), doc.get("reference")
    if not isinstance(made, dict) or not all(_text(made.get(k, "")) for k in ("how", "description")):
        raise bad('"made" must be an object whose "how" and "description" are strings')
    if not isinstance(bundle, dict) or not _sha(bundle.get("sha256")) or not _text(bundle.get("scheme"), 200):
        raise bad('"bundle" must name the owner bundle\'s scheme and SHA-256')
    if reference is not None and (not isinstance(reference, dict) or not _sha(reference.get("sha256"))):
        raise bad('"reference" must be null or name the reference model\'s SHA-256')
    models, detectors = doc.get("models"), doc.get("detectors")
    if not isinstance(models, list) or not models:
        raise bad('"models" must be a non-empty list')
    for m in models:
        if not isinstance(m, dict) or not _text(m.get("name"), 500) or not (_sha(m.get("sha256")) or m.get("files")):
            raise bad("each model needs a name and its SHA-256")
    if not isinstance(detectors, list) or not detectors:
        raise bad('"detectors" must be a non-empty list')
    for d in detectors:
        if not isinstance(d, dict) or not all(_text(d.get(k), 200) for k in ("detector", "scheme", "statistic")):
            raise bad("each detector entry needs its detector, scheme and statistic")
        values, verdicts = d.get("values"), d.get("verdicts")
        if (
            not isinstance(values, list)
            or not isinstance(verdicts, list)
            or not len(values) == len(verdicts) == len(models)
        ):
            raise bad(f"{d['detector']}: one value and one verdict per model")
        if not all(_number_or_null(v) for v in values) or not all(v in VERDICTS for v in verdicts):
            raise bad(f"{d['detector']}: values must be numbers or null, verdicts one of {', '.join(VERDICTS)}")
        rate = d.get("false_positive_rate")
        expected = error_rate(verdicts)
        if not isinstance(rate, dict) or any(
            rate.get(k) != expected[k] for k in ("false_positives", "decided", "errors")
        ):
            raise bad(f"{d['detector']}: its false-positive count does not match its verdicts")


# --- what a report says ---------------------------------------------------------------------------------


def null_values(entry: Mapping[str, Any]) -> list[float]:
    """The numbers of a calibration entry's null distribution (models that gave none left out)."""
    return [float(v) for v in entry.get("values", []) if isinstance(v, int | float) and not isinstance(v, bool)]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _shipped(bundle: OwnerBundle, detector: Any, cache: dict[str, Calibration | str]) -> Calibration | str | None:
    """The calibration ``detector`` ships for ``bundle``, the reason it cannot be read, or ``None``."""
    try:
        path = detector.shipped_calibration(bundle.payload)
    except Exception:  # a plugin's lookup that fails must not lose the audit: no calibration, then
        return None
    if path is None:
        return None
    key = str(path)
    if key not in cache:
        try:
            cache[key] = load_calibration(Path(path), shipped=True)
        except InputError as exc:
            cache[key] = f"the calibration shipped with {detector.id} could not be read: {exc}"
    return cache[key]


def _bundle_of(finding: Finding, bundles: Sequence[OwnerBundle]) -> OwnerBundle | None:
    sha = str(getattr(finding, "bundle", "") or "")
    same = [b for b in bundles if b.scheme == finding.scheme]
    for b in same:
        if sha and b.sha256 == sha:
            return b
    if len(same) == 1:
        return same[0]
    return next((b for b in same if finding.subject.startswith(b.sha256[:12])), None)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def _notes(
    cal: Calibration, entry: Mapping[str, Any], bundle: OwnerBundle | None, options: Mapping[str, Any], reference: bool
) -> list[str]:
    notes = []
    doc = cal.document
    if bundle is not None and doc["bundle"]["sha256"] != bundle.sha256:
        notes.append(
            f"The calibration was measured against another owner bundle of this scheme (SHA-256"
            f" {doc['bundle']['sha256'][:16]}...), not this audit's: it applies as far as the statistic's"
            " distribution on independent models does not depend on the owner's particular key or signature."
        )
    made_with = entry.get("options")
    if isinstance(made_with, Mapping):
        for name, value in sorted(jsonable(options).items()):
            if name in made_with and made_with[name] != value:
                notes.append(
                    f"The calibration ran with {name}={_short(made_with[name])}; this audit ran with"
                    f" {name}={_short(value)}: the false-positive rate is the one at the calibration's settings."
                )
    if reference != (doc.get("reference") is not None):
        notes.append(
            "The calibration's models were audited "
            + ("without" if reference else "with")
            + " a reference model (the restore stage), this suspect "
            + ("with" if reference else "without")
            + " one: the conditions differ."
        )
    return notes


def _rate_entry(
    cal: Calibration, entry: Mapping[str, Any], finding: Finding | None, notes: list[str]
) -> dict[str, Any]:
    nulls = null_values(entry)
    value = _number(finding.metrics.get(str(entry["statistic"]))) if finding is not None else None
    return {
        "detector": entry["detector"], "scheme": entry["scheme"], "statistic": entry["statistic"],
        "subject": finding.subject if finding else None, "verdict": finding.verdict.value if finding else None,
        "value": value, "false_positives": error_rate(entry["verdicts"]),
        "null": {
            "values": len(nulls), "strongest": min(nulls) if nulls else None,
            "at_least_as_strong": sum(v <= value for v in nulls) if value is not None else None,
        },
        "calibration": cal.source(), "notes": notes,
    }  # fmt: skip


def error_rates(
    findings: Sequence[Finding],
    *,
    given: Sequence[Calibration],
    bundles: Sequence[OwnerBundle],
    options: Mapping[str, Mapping[str, Any]],
    reference: bool,
) -> list[dict[str, Any]]:
    """The report's ``calibration`` block: for each watermark finding, the measured false-positive rate of its
    detector from the calibrations ``given`` (``--calibration``) that hold its detector, else from the one the
    detector ships for the finding's owner bundle; each with its bound, how the suspect's statistic compares
    with the null values, which calibration set it came from and where its conditions differ from this
    audit's (``options``: the options set for each detector; ``reference``: whether a reference was given).
    A given calibration that applies to no finding is listed too, saying so."""
    from auditor.bases import Detector
    from auditor.plugin_manager import components

    detectors = {d.id: d for d in components("detectors", Detector)}
    used: set[tuple[int, str, str]] = set()
    cache: dict[str, Calibration | str] = {}
    rows: list[dict[str, Any]] = []
    for finding in findings:
        detector = detectors.get(finding.detector)
        if detector is None or not finding.scheme or finding.verdict.value == "error":
            continue
        settings = detector.options(options.get(detector.id, {}))
        bundle = _bundle_of(finding, bundles)
        chosen = [(i, c) for i, c in enumerate(given) if c.entry(detector.id, finding.scheme) is not None]
        if not chosen and bundle is not None:
            shipped = _shipped(bundle, detector, cache)
            if isinstance(shipped, str):
                rows.append({"detector": detector.id, "scheme": finding.scheme, "subject": finding.subject,
                             "verdict": finding.verdict.value, "error": shipped})  # fmt: skip
            elif shipped is not None and shipped.entry(detector.id, finding.scheme) is not None:
                chosen = [(-1, shipped)]
        for i, cal in chosen:
            used.add((i, detector.id, finding.scheme))
            entry = cal.entry(detector.id, finding.scheme) or {}
            notes = _notes(cal, entry, bundle, settings, reference)
            rows.append(_rate_entry(cal, entry, finding, notes))
    for i, cal in enumerate(given):
        for entry in cal.document["detectors"]:
            if (i, entry["detector"], entry["scheme"]) not in used:
                note = (
                    f"No finding of the {entry['detector']} detector in this audit: this calibration was not applied."
                )
                rows.append(_rate_entry(cal, entry, None, [note]))
    return jsonable(rows)
