"""Run detectors in isolation: one that fails becomes an error finding, not a lost audit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from auditor.bases import Detector
from auditor.findings import Finding, Verdict, sort_findings
from auditor.graph import LayerGraph
from auditor.plugin_manager import components

__all__ = ["EVIDENCE_ANSWERS", "bundle_scheme", "evidence_answer", "overall_verdict", "run_detectors"]


def bundle_scheme(bundle: Any) -> str:
    """The scheme an owner bundle declares (its ``scheme`` attribute or key)."""
    if isinstance(bundle, Mapping):
        return str(bundle.get("scheme", ""))
    return str(getattr(bundle, "scheme", ""))


def _run_one(detector: Detector, suspect: LayerGraph, bundle: Any, context: Mapping[str, Any]) -> list[Finding]:
    try:
        findings = detector.detect(suspect, bundle=bundle, context=context)
        if not isinstance(findings, list) or not all(isinstance(f, Finding) for f in findings):
            raise TypeError(f"detect() returned {type(findings).__name__}, not a list of Finding")
        return findings
    except Exception as exc:  # isolation is the point: record it and go on
        return [
            Finding(
                detector=detector.id,
                scheme=detector.scheme,
                subject=bundle_scheme(bundle) if bundle is not None else "",
                verdict=Verdict.ERROR,
                summary=f"The {detector.id} detector failed and gave no result: {type(exc).__name__}: {exc}",
                metrics={"error_type": type(exc).__name__},
            )
        ]


def run_detectors(
    suspect: LayerGraph,
    *,
    bundles: Sequence[Any] = (),
    context: Mapping[str, Any] | None = None,
    detectors: Sequence[Detector] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Finding]:
    """Every applicable detector's findings on ``suspect``, in a stable order.

    A detector with an empty ``scheme`` runs once with ``bundle=None``; one with
    a scheme runs once per bundle of that scheme. A bundle no detector reads
    gives an inconclusive finding saying so. Each detector's context is
    ``context`` with ``options`` set to ``options[detector.id]`` (validated by
    the caller: :func:`auditor.audit.pipeline.parse_detector_options`).
    """
    shared = dict(context or {})
    options = options or {}

    def context_of(detector: Detector) -> dict[str, Any]:
        return shared | {"options": dict(options.get(detector.id, shared.get("options", {})))}

    chosen = sorted(detectors if detectors is not None else components("detectors", Detector), key=lambda d: d.id)
    findings: list[Finding] = []
    for detector in chosen:
        if not detector.scheme:
            findings.extend(_run_one(detector, suspect, None, context_of(detector)))
    for bundle in bundles:
        scheme = bundle_scheme(bundle)
        readers = [d for d in chosen if d.scheme and d.scheme == scheme]
        made: list[Finding] = []
        if not readers:
            made.append(
                Finding(
                    detector="core",
                    scheme=scheme,
                    subject=scheme,
                    verdict=Verdict.INCONCLUSIVE,
                    summary=f"No installed detector reads owner bundles of scheme {scheme!r}.",
                )
            )
        for detector in readers:
            made.extend(_run_one(detector, suspect, bundle, context_of(detector)))
        sha = bundle.get("sha256") if isinstance(bundle, Mapping) else getattr(bundle, "sha256", "")
        for finding in made:  # which bundle each finding was made with, for the report
            finding.bundle = finding.bundle or str(sha or "")
        findings.extend(made)
    return sort_findings(findings)


#: A finding's answer to its detector's :attr:`~auditor.bases.Detector.evidence` question, by verdict.
EVIDENCE_ANSWERS = {
    Verdict.DETECTED: "yes",
    Verdict.NOT_DETECTED: "no",
    Verdict.INCONCLUSIVE: "untested",
    Verdict.ERROR: "untested",
}


def evidence_answer(finding: Finding, detector: Detector | None) -> dict[str, str] | None:
    """What a bundle-free finding says as a separate line of evidence (``question`` and ``answer``: ``yes``,
    ``no`` or ``untested``), or ``None`` for a finding of a watermark check: one with a scheme, or whose
    detector declares no :attr:`~auditor.bases.Detector.evidence` (or is not installed). Such lines never
    enter :func:`overall_verdict`."""
    if finding.scheme or detector is None or not detector.evidence or finding.detector != detector.id:
        return None
    return {"question": detector.evidence, "answer": EVIDENCE_ANSWERS[finding.verdict]}


def overall_verdict(findings: Sequence[Finding]) -> Verdict:
    """The audit's verdict over the watermark findings (those with a scheme).

    Detected if any scheme's finding is; otherwise inconclusive if any is
    inconclusive or failed, or if there was no watermark finding at all (no
    owner bundle, nothing looked for); otherwise not detected. Bundle-free
    checks (empty scheme) inform the report but never decide the verdict,
    including those that answer another question (:func:`evidence_answer`:
    a model derived from the reference is not one carrying the owner's mark).
    """
    verdicts = {f.verdict for f in findings if f.scheme}
    if Verdict.DETECTED in verdicts:
        return Verdict.DETECTED
    if not verdicts or verdicts & {Verdict.INCONCLUSIVE, Verdict.ERROR}:
        return Verdict.INCONCLUSIVE
    return Verdict.NOT_DETECTED
