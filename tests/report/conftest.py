"""Fixtures of the report tests: a restorer whose log has every part the report draws."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from auditor import LayerGraph, Restorer
from auditor.errors import EXIT_INCONCLUSIVE, EXIT_NOT_FOUND, EXIT_OK
from auditor.toolkit import figures


class Aligner(Restorer):
    id = "test-aligner"
    order = 5
    description = "pretends to align channels"

    def restore(self, suspect: LayerGraph, reference: LayerGraph) -> tuple[LayerGraph, dict[str, Any]]:
        rows = [
            {"name": "conv2", "moved": 6, "similarity_before": 0.125, "similarity_after": 0.996, "padded": 0,
             "dropped": 0, "permutation": [1, 0, 3, 2, 5, 4, 6, 7], "scale": {"min": 0.5, "max": 2.0}},
            {"name": "conv3", "moved": 0, "similarity_before": 0.981, "similarity_after": 0.981, "padded": 2,
             "dropped": 1, "permutation": [0, 1, None, 2]},
        ]  # fmt: skip
        return suspect, {"derived": {"derived": True, "score": 0.97, "threshold": 0.5}, "layers": rows}

    def figure(self, entry: Any) -> Any:
        """Its pictures, drawn as any third-party restorer would draw them (the presentation contract)."""
        return figures.alignment(entry)


@pytest.fixture
def aligner() -> Restorer:
    """A restorer that changes nothing but logs two layers' channel matching (one moved, one padded and
    cut), so that the report draws its restore table and pictures."""
    return Aligner()


@pytest.fixture
def audit(run_cli: Callable[..., Any]) -> Callable[..., tuple[int, dict[str, Any], str]]:
    """``audit(*args, folder)``: run ``auditor audit ... --out folder/report.html``; exit code, JSON twin, HTML."""

    def run(*args: str | Path) -> tuple[int, dict[str, Any], str]:
        out = Path(str(args[-1]))
        code, _, stderr = run_cli("audit", *args[:-1], "--out", out / "report.html")
        assert code in (EXIT_OK, EXIT_NOT_FOUND, EXIT_INCONCLUSIVE), stderr
        return code, json.loads((out / "report.json").read_text()), (out / "report.html").read_text()

    return run
