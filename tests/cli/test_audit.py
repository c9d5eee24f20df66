"""``auditor audit`` with reports, several suspects, and ``auditor report verify``, run in this process.

The audits several folders look at (``gr_reports``, ``batch_run``) are fixtures in tests/conftest.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from auditor import keys
from auditor.errors import EXIT_INCONCLUSIVE, EXIT_INPUT, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE


def test_audit_writes_html_and_json_and_prints_one_line_per_finding(gr_reports: dict[str, Any]) -> None:
    assert gr_reports["code"] == EXIT_OK, gr_reports["stderr"]
    lines = gr_reports["stdout"].splitlines()
    assert lines[0].startswith("greedy-residuals: detected: The suspect carries the owner's signature")
    assert lines[1:] == ["verdict: detected", f"report: {gr_reports['html']}", f"json: {gr_reports['json']}"]
    data = json.loads(gr_reports["json"].read_text())
    assert data["run"]["case_id"] == gr_reports["case_id"] and data["run"]["analyst"] == gr_reports["analyst"]
    assert data["verdict"] == "detected" and data["exit_code"] == EXIT_OK
    assert data["suspect"]["size"] == gr_reports["out"].joinpath("suspect.safetensors").stat().st_size
    assert data["integrity"]["html_sha256"] is not None


def test_json_flag_still_prints_the_result(gr_owner: SimpleNamespace, run_cli: Callable[..., Any]) -> None:
    code, stdout, _ = run_cli("audit", gr_owner.files["safetensors"], "--json")
    assert code == EXIT_INCONCLUSIVE  # no bundle: nothing looked for
    data = json.loads(stdout)
    assert data["verdict"] == "inconclusive" and data["findings"] == []
    assert data["suspect"]["format"] == "safetensors"
    assert data["suspect"]["files"][0]["sha256"] == data["suspect"]["sha256"]


def test_clean_model_is_not_detected(
    gr_owner: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any], clean_model: Callable[..., Any]
) -> None:
    suspect = clean_model(tmp_path / "clean.safetensors")
    code, stdout, _ = run_cli("audit", suspect, "--bundle", gr_owner.out / "owner_bundle.json", "--json-out",
                              tmp_path / "r.json")  # fmt: skip
    assert code == EXIT_NOT_FOUND
    assert stdout.splitlines()[-1] == f"json: {tmp_path / 'r.json'}"
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "not-detected"
    assert not (tmp_path / "r.html").exists()


def test_report_verify_cli(gr_reports: dict[str, Any], tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    code, stdout, _ = run_cli("report", "verify", gr_reports["json"], "--html", gr_reports["html"])
    assert (code, stdout) == (EXIT_OK, f"intact: {gr_reports['json']}: content intact (not signed)\n")
    altered = tmp_path / "altered.json"
    altered.write_text(
        gr_reports["json"].read_text().replace(gr_reports["analyst"], gr_reports["analyst"].replace("a", "e", 1))
    )
    code, stdout, _ = run_cli("report", "verify", altered)
    assert code == EXIT_NOT_FOUND
    assert stdout == f"FAILED: {altered}: altered: the content does not match its recorded SHA-256\n"
    code, _, stderr = run_cli("report", "verify", tmp_path / "missing.json")
    assert (code, stderr) == (EXIT_INPUT, f"error: {tmp_path / 'missing.json'}: no such file\n")


def test_signed_audit_verifies_only_under_its_key(
    gr_owner: SimpleNamespace, signer: keys.KeyPairPaths, tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    passphrase = signer.private.parent.parent / "pass.txt"
    code, _, stderr = run_cli(
        "audit", gr_owner.files["safetensors"], "--bundle", gr_owner.out / "owner_bundle.json", "--out",
        tmp_path / "r.html", "--sign-key", signer.private, "--passphrase-file", passphrase,
    )  # fmt: skip
    assert code == EXIT_OK, stderr
    report = tmp_path / "r.json"
    code, stdout, _ = run_cli("report", "verify", report, "--public-key", signer.public)
    assert code == EXIT_OK and "signature valid (the given key" in stdout
    other = keys.generate_keypair(tmp_path / "other", algorithm="ed25519")
    code, stdout, _ = run_cli("report", "verify", report, "--public-key", other.public)
    assert code == EXIT_NOT_FOUND and "not by the given key" in stdout
    text = report.read_text() + (tmp_path / "r.html").read_text()
    private_lines = [line for line in signer.private.read_text().splitlines() if "-----" not in line]
    assert private_lines and not any(line in text for line in private_lines)
    assert "PRIVATE" not in text and "correct horse" not in text


def test_unsigned_report_fails_when_a_key_is_required(
    gr_reports: dict[str, Any], signer: keys.KeyPairPaths, run_cli: Callable[..., Any]
) -> None:
    code, stdout, _ = run_cli("report", "verify", gr_reports["json"], "--public-key", signer.public)
    assert code == EXIT_NOT_FOUND and "not signed" in stdout


def test_batch_goes_on_past_a_broken_file(batch_run: dict[str, Any], run_cli: Callable[..., Any]) -> None:
    assert batch_run["code"] == EXIT_INPUT  # a file could not be audited: the batch is incomplete
    out, broken = batch_run["out"], batch_run["broken"]
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["name"]: row for row in summary["suspects"]}
    assert list(rows) == ["a_copy.safetensors", "b_broken.safetensors", "c_clean.safetensors"]
    assert rows["a_copy.safetensors"]["verdict"] == "detected"
    assert rows["c_clean.safetensors"]["verdict"] == "not-detected"
    assert rows["b_broken.safetensors"]["exit_code"] == EXIT_INPUT
    assert rows["b_broken.safetensors"]["path"] == str(broken)
    assert str(broken) not in rows["b_broken.safetensors"]["error"]  # the row names the file; the error says what
    assert rows["b_broken.safetensors"]["report"] is None
    assert summary["counts"] == {"detected": 1, "error": 1, "not-detected": 1}
    assert sorted(p.name for p in out.iterdir()) == [
        "a_copy.safetensors.html", "a_copy.safetensors.json", "c_clean.safetensors.html",
        "c_clean.safetensors.json", "summary.html", "summary.json",
    ]  # fmt: skip
    (line,) = [x for x in batch_run["stdout"].splitlines() if "error (exit 4)" in x]
    assert line.startswith(f"{broken}: error (exit 4): ") and line.count(str(broken)) == 1  # named once
    assert batch_run["stdout"].splitlines()[-1] == f"summary: {out / 'summary.html'}"
    for name in ("summary.json", "a_copy.safetensors.json"):
        assert run_cli("report", "verify", out / name)[0] == EXIT_OK


def test_batch_without_errors_takes_the_detection(
    gr_owner: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any], clean_model: Callable[..., Any]
) -> None:
    clean = clean_model(tmp_path / "clean.safetensors")
    code, stdout, _ = run_cli("audit", clean, gr_owner.files["safetensors"], "--bundle",
                              gr_owner.out / "owner_bundle.json", "--json")  # fmt: skip
    assert code == EXIT_OK
    summary = json.loads(stdout)
    assert [r["verdict"] for r in summary["suspects"]] == ["not-detected", "detected"]
    code, _, _ = run_cli("audit", clean, clean, "--bundle", gr_owner.out / "owner_bundle.json")
    assert code == EXIT_NOT_FOUND


def test_reports_never_overwrite_inputs(
    gr_owner: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any], clean_model: Callable[..., Any]
) -> None:
    suspect = clean_model(tmp_path / "suspect.safetensors")
    before = suspect.read_bytes()
    code, _, stderr = run_cli("audit", suspect, "--json-out", suspect)
    assert code == EXIT_USAGE
    assert stderr == f"error: {suspect}: is one of the audit's input files; auditor never writes over its inputs\n"
    assert suspect.read_bytes() == before
    other = clean_model(tmp_path / "other.safetensors", seed=2)
    code, _, stderr = run_cli("audit", suspect, other, "--json-out", tmp_path / "x.json")
    assert code == EXIT_USAGE and "--json-out does not apply" in stderr


def test_bad_sign_key_is_one_line(
    gr_owner: SimpleNamespace, signer: keys.KeyPairPaths, tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    code, _, stderr = run_cli("audit", gr_owner.files["safetensors"], "--sign-key", signer.private)
    assert (code, stderr) == (EXIT_INPUT, f"error: {signer.private}: the key is encrypted: give its passphrase\n")


def test_empty_suspect_folder_is_a_usage_error(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    (tmp_path / "empty").mkdir()
    code, _, stderr = run_cli("audit", tmp_path / "empty")
    assert (code, stderr) == (EXIT_USAGE, f"error: {tmp_path / 'empty'}: the folder holds no suspect files\n")


def test_missing_suspect_keeps_its_exit_code(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    code, stdout, stderr = run_cli("audit", tmp_path / "nope.safetensors", "--out", tmp_path / "r.html")
    assert (code, stdout) == (EXIT_INPUT, "")
    assert stderr == f"error: {tmp_path / 'nope.safetensors'}: no such file or folder\n"
    assert not (tmp_path / "r.html").exists()


def test_report_hash_is_the_files_and_the_file_is_untouched(gr_reports: dict[str, Any]) -> None:
    suspect = gr_reports["out"] / "suspect.safetensors"
    data = json.loads(gr_reports["json"].read_text())
    assert hashlib.sha256(suspect.read_bytes()).hexdigest() == data["suspect"]["sha256"]
