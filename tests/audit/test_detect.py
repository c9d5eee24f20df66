"""The audit's overall verdict over findings."""

from __future__ import annotations

import pytest

from auditor.audit.detect import overall_verdict
from auditor.findings import Finding, Verdict

D, N, INC, E = Verdict.DETECTED, Verdict.NOT_DETECTED, Verdict.INCONCLUSIVE, Verdict.ERROR


def finding(verdict: Verdict, scheme: str = "s") -> Finding:
    return Finding(detector="d", verdict=verdict, summary="", scheme=scheme)


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        ([D], D),
        ([N, D], D),
        ([INC, D], D),
        ([N], N),
        ([N, N], N),
        ([N, INC], INC),
        ([N, E], INC),
        ([], INC),
    ],
)
def test_overall_verdict(verdicts: list[Verdict], expected: Verdict) -> None:
    assert overall_verdict([finding(v) for v in verdicts]) is expected


def test_bundle_free_findings_never_decide() -> None:
    assert overall_verdict([finding(D, scheme="")]) is Verdict.INCONCLUSIVE
    assert overall_verdict([finding(D, scheme=""), finding(N)]) is Verdict.NOT_DETECTED
