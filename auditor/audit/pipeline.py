"""One audit, one direction: inputs -> load (hashed) -> restore -> detect -> an :class:`AuditRecord`.

Each stage is its own module (:mod:`.inputs`, :mod:`.load`, :mod:`.restore`,
:mod:`.detect`); this one only runs them in order. The report
(:mod:`auditor.report`) turns the record into evidence; nothing here knows it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditor.audit.detect import overall_verdict, run_detectors
from auditor.audit.inputs import AuditInputs, expand_suspects, load_inputs, parse_detector_options
from auditor.audit.load import LoadedModel, hashed_load
from auditor.audit.restore import run_restorers
from auditor.errors import (
    EXIT_INCONCLUSIVE,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PLUGIN,
    EXIT_UNSAFE,
    AuditorError,
)
from auditor.findings import Finding, Verdict
from auditor.graph import LayerGraph

__all__ = [
    "BATCH_SEVERITY",
    "EXIT_FOR_VERDICT",
    "AuditInputs",
    "AuditRecord",
    "FailedControl",
    "audit_controls",
    "audit_suspect",
    "batch_exit_code",
    "expand_suspects",
    "load_inputs",
    "parse_detector_options",
]

EXIT_FOR_VERDICT = {
    Verdict.DETECTED.value: EXIT_OK,
    Verdict.NOT_DETECTED.value: EXIT_NOT_FOUND,
    Verdict.INCONCLUSIVE.value: EXIT_INCONCLUSIVE,
}
#: Several suspects: the exit code is the first of these that any file gave. A file that could not be
#: audited makes the batch incomplete, so errors come first; then one detection makes the batch a
#: detection; an inconclusive file keeps it from being declared clean.
BATCH_SEVERITY = (EXIT_INTERNAL, EXIT_PLUGIN, EXIT_UNSAFE, EXIT_INPUT, EXIT_OK, EXIT_INCONCLUSIVE, EXIT_NOT_FOUND)


@dataclass
class AuditRecord:
    """One suspect's audit: the model as loaded and hashed, the restore log, the findings and the verdict."""

    model: LoadedModel
    restore: list[dict[str, Any]]
    findings: list[Finding]
    verdict: Verdict

    @property
    def path(self) -> Path:
        """The suspect as named."""
        return self.model.path

    @property
    def graph(self) -> LayerGraph:
        """The suspect's layer graph as loaded (before any restore)."""
        return self.model.graph

    @property
    def files(self) -> list[dict[str, Any]]:
        """Every file the suspect was read from: name, path, size, sha256."""
        return self.model.files

    @property
    def exit_code(self) -> int:
        """The documented exit code of this verdict."""
        return EXIT_FOR_VERDICT[self.verdict.value]


def audit_suspect(path: Path, inputs: AuditInputs, progress: Callable[[int], None] | None = None) -> AuditRecord:
    """Load ``path`` safely (hashing it meanwhile), restore it against the reference (if any), and run every
    applicable detector with its options."""
    with hashed_load(path, progress) as loading:
        graph, log = loading.graph, list[dict[str, Any]]()
        reference = inputs.reference.graph if inputs.reference is not None else None
        if reference is not None:
            graph, log = run_restorers(graph, reference)
        context = {"reference": reference, "restore": log}  # what a detector may compare the suspect with
        findings = run_detectors(graph, bundles=inputs.bundles, options=inputs.options, context=context)
        model = loading.finish()
    return AuditRecord(model, log, findings, overall_verdict(findings))


@dataclass
class FailedControl:
    """A negative control that could not be audited: its path as given, the one-line error and its exit code."""

    path: Path
    error: str
    exit_code: int


def audit_controls(
    inputs: AuditInputs, on_control: Callable[[AuditRecord | FailedControl], None] | None = None
) -> list[AuditRecord | FailedControl]:
    """Audit each negative control of ``inputs`` exactly as a suspect (same bundles, reference and options) and
    keep the records in ``inputs.controls``, where the report finds them. A control that cannot be audited is
    recorded as a :class:`FailedControl`, never raised: controls never change the suspect's verdict or exit
    code. ``on_control`` sees each result as it comes."""
    done: list[AuditRecord | FailedControl] = []
    for path in inputs.control_paths:
        result: AuditRecord | FailedControl
        try:
            result = audit_suspect(path, inputs)
        except AuditorError as exc:
            result = FailedControl(path, str(exc), exc.exit_code)
        except Exception as exc:  # a bug on a control must not lose the suspect's audit
            result = FailedControl(path, f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL)
        done.append(result)
        if on_control is not None:
            on_control(result)
    inputs.controls = list(done)
    return done


def batch_exit_code(codes: Sequence[int]) -> int:
    """The batch's exit code: the most serious of the files' codes (:data:`BATCH_SEVERITY`)."""
    return next((c for c in BATCH_SEVERITY if c in codes), EXIT_INTERNAL)
