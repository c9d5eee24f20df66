"""`auditor audit --option DETECTOR.NAME=VALUE`: validated once, passed to the detector, recorded."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from auditor.errors import EXIT_OK, EXIT_USAGE


def _audit(run_cli: Callable[..., Any], owner: SimpleNamespace, *args: str) -> tuple[int, dict[str, Any], str]:
    code, stdout, stderr = run_cli(
        "audit", owner.files["safetensors"], "--bundle", owner.out / "owner_bundle.json", "--json", *args
    )
    return code, (json.loads(stdout) if stdout.strip() else {}), stderr


def test_a_threshold_set_as_an_option_changes_the_verdict_and_is_recorded(
    gr_owner: SimpleNamespace, run_cli: Callable[..., Any]
) -> None:
    code, report, _ = _audit(run_cli, gr_owner)
    assert code == EXIT_OK
    log10_p = report["findings"][0]["metrics"]["log10_combined_p"]
    strict = f"{10 ** (log10_p - 5):.3e}"  # far below what the owner's model reaches: not found
    code, report, _ = _audit(run_cli, gr_owner, "--option", f"greedy-residuals.p_threshold={strict}")
    assert report["findings"][0]["verdict"] == "not-detected"
    assert report["findings"][0]["metrics"]["p_threshold"] == float(strict)
    assert f"--option greedy-residuals.p_threshold={float(strict)!r}" in report["command"]


def test_a_documented_alias_is_the_same_option(gr_owner: SimpleNamespace, run_cli: Callable[..., Any]) -> None:
    _, by_alias, _ = _audit(run_cli, gr_owner, "--p-threshold", "1e-9")
    _, by_option, _ = _audit(run_cli, gr_owner, "--option", "greedy-residuals.p_threshold=1e-9")
    assert by_alias["command"] == by_option["command"]
    assert by_alias["findings"][0]["metrics"]["p_threshold"] == 1e-9


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ("nobody.x=1", "no detector 'nobody'"),
        ("greedy-residuals.speed=1", "detector 'greedy-residuals' has no option 'speed'"),
        ("greedy-residuals.p_threshold=2", "must be a number strictly between 0 and 1"),
        ("greedy-residuals.p_threshold", "write it as DETECTOR.NAME=VALUE"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2_before_anything_is_read(
    option: str, words: str, run_cli: Callable[..., Any], tmp_path: Path
) -> None:
    # The suspect and bundle do not exist: the options are checked first.
    code, _, stderr = run_cli("audit", tmp_path / "missing.pt", "--bundle", tmp_path / "b.json", "-O", option)
    assert code == EXIT_USAGE
    assert words in stderr and stderr.count("\n") == 1 and stderr.startswith("error: ")


def test_audit_help_lists_every_declared_option(run_cli: Callable[..., Any]) -> None:
    code, stdout, _ = run_cli("audit", "--help")
    assert code == 0
    for name in ("greedy-residuals.p_threshold", "hufunet.tau_acc", "hufunet.public_data", "--public-data"):
        assert name in stdout


def test_plugins_json_lists_the_options(run_cli: Callable[..., Any]) -> None:
    code, stdout, _ = run_cli("plugins", "--json")
    rows = {r["name"]: r for r in json.loads(stdout)}
    options = rows["auditor.plugins.hufunet.detector"]["options"]["detectors/hufunet"]
    assert [p["name"] for p in options] == ["tau_acc", "p_threshold", "public_data"]
    assert code == 0
