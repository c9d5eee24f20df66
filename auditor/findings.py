"""What detectors report: findings with a verdict, numbers and a plain sentence."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Finding", "Verdict", "sort_findings"]


class Verdict(str, enum.Enum):
    """A detector's conclusion about one owner bundle and one suspect."""

    DETECTED = "detected"
    NOT_DETECTED = "not-detected"
    INCONCLUSIVE = "inconclusive"
    ERROR = "error"  # the detector failed; the audit goes on without it

    def __str__(self) -> str:
        return self.value


@dataclass
class Finding:
    """One detector's result.

    ``summary`` is one plain sentence a non-specialist can read; ``metrics``
    holds the numbers behind it (JSON-ready values only); ``details`` holds
    per-layer tables and anything else a report may show. ``subject`` names what
    the finding is about (a bundle, a layer) so that findings sort stably.
    """

    detector: str
    verdict: Verdict
    summary: str
    scheme: str = ""
    subject: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    #: The SHA-256 of the owner bundle the finding was made with (set by the core; empty for bundle-free checks).
    bundle: str = ""

    def sort_key(self) -> tuple[str, str, str]:
        """The stable key findings are ordered by: scheme, detector, subject."""
        return (self.scheme, self.detector, self.subject)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "detector": self.detector,
            "scheme": self.scheme,
            "subject": self.subject,
            "verdict": self.verdict.value,
            "summary": self.summary,
            "metrics": self.metrics,
            "details": self.details,
            "bundle": self.bundle,
        }


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Findings in their stable order, independent of plugin call order."""
    return sorted(findings, key=Finding.sort_key)
