"""The audit's inputs: the suspects named on the command line, the owner bundles, the reference model
and the detectors' options, each checked before any suspect is read."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auditor.audit.calibration import Calibration, load_calibration
from auditor.audit.load import LoadedModel, is_model, load_hashed
from auditor.bundle import OwnerBundle
from auditor.errors import AuditorError, BundleFieldError, InputError, UsageError

__all__ = ["AuditInputs", "expand_suspects", "load_inputs", "parse_detector_options", "validate_bundle"]


@dataclass
class AuditInputs:
    """What every suspect of one audit is checked against, and the detectors' options as given."""

    bundles: list[OwnerBundle]
    reference: LoadedModel | None = None
    bundle_paths: list[Path] = field(default_factory=list)
    #: Detector id -> option name -> value, validated against the detector's :attr:`~auditor.bases.Param` list;
    #: only the options the user set (each detector fills in its own defaults).
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Negative controls: models known to be independent of the owner's, audited in the same run with the same
    #: bundles, reference and options (``--control``); their verdicts never change the suspect's.
    control_paths: list[Path] = field(default_factory=list)
    #: The controls' audit records (:class:`auditor.audit.pipeline.AuditRecord`, or a failed control's error),
    #: filled in by :func:`auditor.audit.pipeline.audit_controls`.
    controls: list[Any] = field(default_factory=list)
    #: Calibrations given with ``--calibration`` (a detector's shipped one applies where none is given).
    calibrations: list[Calibration] = field(default_factory=list)

    def reference_entry(self) -> dict[str, Any] | None:
        """The report's description of the reference model, or ``None``."""
        from auditor.jsondata import jsonable

        return None if self.reference is None else jsonable(self.reference.entry())

    def command(self, *suspects: Path) -> str:
        """The command that reproduces the audit of ``suspects``, with every option that changes its result."""
        args = ["auditor", "audit", *map(str, suspects)]
        for p in self.bundle_paths:
            args += ["--bundle", str(p)]
        if self.reference is not None:
            args += ["--reference", str(self.reference.path)]
        for detector_id, values in sorted(self.options.items()):
            for name, value in sorted(values.items()):
                args += ["--option", f"{detector_id}.{name}={_option_text(value)}"]
        for p in self.control_paths:
            args += ["--control", str(p)]
        for c in self.calibrations:
            args += ["--calibration", str(c.path)]
        return shlex.join(args)


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def parse_detector_options(given: Mapping[str, Any] | Sequence[str]) -> dict[str, dict[str, Any]]:
    """Detector options, validated once against the registered detectors' parameters.

    ``given`` is either ``ID.NAME=VALUE`` strings (the command line's ``--option``) or a mapping from
    ``ID.NAME`` to a value. An unknown detector or option, or a value of the wrong kind, is a
    :class:`~auditor.errors.UsageError` that names the choices."""
    from auditor.bases import Detector
    from auditor.plugin_manager import components

    detectors = {d.id: d for d in components("detectors", Detector)}
    pairs: list[tuple[str, Any]] = []
    if isinstance(given, Mapping):
        pairs = [(str(k), v) for k, v in given.items()]
    else:
        for item in given:
            name, sep, value = str(item).partition("=")
            if not sep:
                raise UsageError(f"--option {item!r}: write it as DETECTOR.NAME=VALUE")
            pairs.append((name.strip(), value))
    options: dict[str, dict[str, Any]] = {}
    for key, value in pairs:
        detector_id, dot, name = key.rpartition(".")
        if not dot or not detector_id or not name:
            raise UsageError(f"--option {key!r}: name the detector and the option, as DETECTOR.NAME=VALUE")
        detector = detectors.get(detector_id)
        if detector is None:
            raise UsageError(f"--option {key!r}: no detector {detector_id!r}; installed: {', '.join(detectors)}")
        param = {p.name: p for p in detector.params}.get(name.replace("-", "_"))
        if param is None:
            known = ", ".join(p.name for p in detector.params) or "none"
            raise UsageError(f"--option {key!r}: detector {detector_id!r} has no option {name!r}; its options: {known}")
        options.setdefault(detector_id, {})[param.name] = param.convert(value, detector_id)
    return options


def load_inputs(
    *,
    bundles: Sequence[Path],
    reference: Path | None,
    options: Mapping[str, Any] | Sequence[str] = (),
    controls: Sequence[Path] = (),
    calibrations: Sequence[Path] = (),
) -> AuditInputs:
    """Check the detector options, then load the owner bundles (sorted by scheme and SHA-256), the
    calibrations and the reference model, hashed. ``controls`` are only recorded here: they are audited
    like suspects (:func:`auditor.audit.pipeline.audit_controls`)."""
    from auditor.bundle import load_bundle

    parsed = parse_detector_options(options)
    loaded = sorted((load_bundle(p) for p in bundles), key=lambda b: (b.scheme, b.sha256))
    for bundle in loaded:
        validate_bundle(bundle)
    given = [load_calibration(p) for p in calibrations]
    ref = load_hashed(reference) if reference is not None else None
    return AuditInputs(
        bundles=loaded, reference=ref, bundle_paths=list(bundles), options=parsed, control_paths=list(controls),
        calibrations=given,
    )  # fmt: skip


def validate_bundle(bundle: OwnerBundle) -> None:
    """Check ``bundle``'s payload with every registered detector of its scheme
    (:meth:`~auditor.bases.Detector.validate_bundle`); a field it refuses is an
    :class:`~auditor.errors.InputError` naming the bundle file and the field."""
    from auditor.bases import Detector
    from auditor.plugin_manager import components

    for detector in components("detectors", Detector):
        if not detector.scheme or detector.scheme != bundle.scheme:
            continue
        try:
            detector.validate_bundle(bundle.payload)
        except BundleFieldError as exc:
            raise InputError(bundle.path, str(exc)) from None
        except AuditorError:
            raise
        except ValueError as exc:
            raise InputError(bundle.path, f"the {detector.id} detector refuses its payload: {exc}") from None


def expand_suspects(paths: Sequence[Path]) -> tuple[list[Path], bool]:
    """The suspects named on the command line, a folder that is no model standing for the entries in it
    (sorted by name, hidden ones left out), each file once however often it was named (the first naming
    counts); and whether this is a batch (several suspects)."""
    out: list[Path] = []
    folder = False
    for p in paths:
        if p.is_dir() and not is_model(p):
            folder = True
            entries = sorted((c for c in p.iterdir() if not c.name.startswith(".")), key=lambda c: c.name)
            if not entries:
                raise UsageError(f"{p}: the folder holds no suspect files")
            out.extend(entries)
        else:
            out.append(p)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve() if p.exists() else p.absolute()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, folder or len(unique) > 1
