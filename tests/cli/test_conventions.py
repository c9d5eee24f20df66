"""Command-line conventions: one line for every usage error (exit 2), -h everywhere, -q and -v, a hint when
no bundle is given, a suspect named twice audited once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from auditor.errors import EXIT_INCONCLUSIVE, EXIT_INPUT, EXIT_OK, EXIT_USAGE


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["audit"], "Missing argument"),
        (["--bogus"], "No such option: --bogus"),
        (["audit", "x.pt", "--no-such-flag"], "No such option: --no-such-flag"),
        (["no-such-command"], "No such command"),
        (["audit", "x.pt", "--p-threshold", "abc"], "option p_threshold must be a number"),
        (["keys", "new"], "Missing option"),
        (["report", "verify"], "Missing argument"),
        (["inspect", "x.pt", "--json", "extra"], "unexpected extra argument"),
    ],
)
def test_every_usage_error_is_one_line_and_exit_2(run_cli: Callable[..., Any], args: list[str], words: str) -> None:
    code, stdout, stderr = run_cli(*args)
    assert code == EXIT_USAGE, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert words.lower() in stderr.lower()
    assert "╭" not in stderr and "Traceback" not in stderr and stdout == ""


@pytest.mark.parametrize(
    "command", [[], ["audit"], ["inspect"], ["plugins"], ["report", "verify"], ["keys", "new"], ["calibrate"],
                ["embed", "greedy-residuals"], ["attack"], ["evaluate"]],
)  # fmt: skip
def test_dash_h_is_help_everywhere(run_cli: Callable[..., Any], command: list[str]) -> None:
    code, stdout, _ = run_cli(*command, "-h")
    assert code == 0
    assert "Usage:" in stdout and "--help" in stdout


def test_quiet_prints_only_the_verdict_and_verbose_adds_notes(
    run_cli: Callable[..., Any], gr_owner: SimpleNamespace
) -> None:
    args = ["audit", gr_owner.files["safetensors"], "--bundle", gr_owner.out / "owner_bundle.json"]
    code, normal, _ = run_cli(*args)
    assert code == EXIT_OK and "greedy-residuals: detected:" in normal
    code, quiet, _ = run_cli("-q", *args)
    assert code == EXIT_OK and quiet.splitlines() == ["verdict: detected"]
    code, _, notes = run_cli("-v", *args, "--reference", gr_owner.files["safetensors"])
    assert code == EXIT_OK and "note: restore: restore-channels: ok" in notes
    code, _, stderr = run_cli("-q", "-v", *args)
    assert code == EXIT_USAGE and stderr.count("\n") == 1


def test_audit_without_a_bundle_says_what_to_give(run_cli: Callable[..., Any], gr_owner: SimpleNamespace) -> None:
    code, stdout, stderr = run_cli("audit", gr_owner.files["safetensors"])
    assert code == EXIT_INCONCLUSIVE and "verdict: inconclusive" in stdout
    assert "note: no owner bundle was given (--bundle OWNER_BUNDLE)" in stderr
    _, _, quiet = run_cli("-q", "audit", gr_owner.files["safetensors"])
    assert quiet == ""


def test_a_suspect_named_twice_is_audited_once(run_cli: Callable[..., Any], gr_owner: SimpleNamespace) -> None:
    model = gr_owner.files["safetensors"]
    same = Path(str(model).replace(model.name, f"./{model.name}"))
    code, stdout, stderr = run_cli("audit", model, same, "--bundle", gr_owner.out / "owner_bundle.json", "--json")
    assert code == EXIT_OK
    report = json.loads(stdout)
    assert report["report_format"] == "auditor-evidence-report"  # one suspect: one report, not a batch summary
    assert "named more than once" in stderr


def test_report_verify_on_a_bundle_is_not_a_report(run_cli: Callable[..., Any], gr_owner: SimpleNamespace) -> None:
    code, stdout, stderr = run_cli("report", "verify", gr_owner.out / "owner_bundle.json")
    assert code == EXIT_INPUT
    assert (stdout + stderr).count("\n") == 1
