"""``auditor audit --control`` and ``--calibration``: negative controls audited in the same run and shown beside
the suspect, never changing its verdict or exit code; the measured false-positive rate beside the exact tail
bound, and the set it came from."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from auditor.errors import EXIT_NOT_FOUND, EXIT_OK


@pytest.fixture(scope="module")
def controlled(
    gr_owner: SimpleNamespace,
    clean_model: Callable[..., Path],
    run_cli: Callable[..., Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> SimpleNamespace:
    """The owner's model audited with two controls: an independent model and a copy of the owner's model
    (which should never pass as a control), with a calibration of three independent models."""
    out = tmp_path_factory.mktemp("controls")
    bundle = gr_owner.out / "owner_bundle.json"
    suspect = shutil.copy(gr_owner.files["safetensors"], out / "suspect.safetensors")
    independent = clean_model(out / "independent.safetensors", seed=5)
    copy = shutil.copy(gr_owner.files["safetensors"], out / "copy-of-owner.safetensors")
    models = out / "calibration-models"
    models.mkdir()
    for seed in (21, 22, 23):
        clean_model(models / f"m{seed}.safetensors", seed=seed)
    calibrated = run_cli("calibrate", "--bundle", bundle, "--models", models, "--out", out / "cal.json")
    assert calibrated.code == EXIT_OK, calibrated.stderr
    html = out / "report.html"
    result = run_cli("audit", suspect, "--bundle", bundle, "--control", independent, "--control", copy,
                     "--calibration", out / "cal.json", "--out", html)  # fmt: skip
    return SimpleNamespace(result=result, html=html, data=json.loads((out / "report.json").read_text()),
                           out=out, bundle=bundle, suspect=suspect, independent=independent, copy=copy)  # fmt: skip


def test_controls_never_change_the_suspects_verdict_or_exit_code(controlled: SimpleNamespace) -> None:
    assert controlled.result.code == EXIT_OK, controlled.result.stderr
    assert controlled.data["verdict"] == "detected" and controlled.data["exit_code"] == EXIT_OK


def test_controls_are_in_the_report_json_with_their_hashes_verdicts_and_numbers(controlled: SimpleNamespace) -> None:
    block = controlled.data["controls"]
    independent, copy = block["models"]
    assert independent["name"] == "independent.safetensors"
    assert independent["sha256"] == hashlib.sha256(controlled.independent.read_bytes()).hexdigest()
    assert independent["verdict"] == "not-detected"
    [row] = independent["findings"]
    assert (row["detector"], row["verdict"]) == ("greedy-residuals", "not-detected")
    assert row["statistic"] == "log10_combined_p"
    assert -3 < row["value"] <= 0
    suspect_row = block["suspect"]["findings"][0]
    finding = controlled.data["findings"][0]
    assert suspect_row["value"] == finding["metrics"]["log10_combined_p"] < -20
    assert copy["verdict"] == "detected" and block["detected"] == ["copy-of-owner.safetensors"]
    assert block["failed"] == []
    # Recorded in the reproducible command, like every input.
    command = controlled.data["command"]
    assert f"--control {controlled.independent} --control {controlled.copy}" in command
    assert f"--calibration {controlled.out / 'cal.json'}" in command


def test_controls_are_in_the_html_beside_the_suspect(controlled: SimpleNamespace) -> None:
    html = controlled.html.read_text()
    table = html[html.index('id="controls"') :]
    assert table.index("suspect.safetensors") < table.index("independent.safetensors") < table.index("copy-of-owner")
    assert hashlib.sha256(controlled.independent.read_bytes()).hexdigest() in table
    assert "watermark not found" in table and "(control)" in table


def test_a_control_that_is_a_copy_of_the_owners_model_is_flagged_at_the_top(controlled: SimpleNamespace) -> None:
    html = controlled.html.read_text()
    warning = html.index('id="control-warning"')
    assert warning < html.index('id="run"') and warning < html.index('id="findings"')
    assert "A negative control was claimed." in html[warning : warning + 1200]
    assert "<b>copy-of-owner.safetensors</b>" in html[warning : warning + 1200]
    assert "came out detected" in controlled.result.stderr and "copy-of-owner" in controlled.result.stderr
    assert "control " + str(controlled.copy) + ": detected" in controlled.result.stdout


def test_the_report_shows_the_measured_false_positive_rate_and_its_set(controlled: SimpleNamespace) -> None:
    [row] = controlled.data["calibration"]
    assert row["false_positives"]["false_positives"] == 0 and row["false_positives"]["decided"] == 3
    assert row["calibration"]["file"] == "cal.json" and not row["calibration"]["shipped"]
    assert row["calibration"]["sha256"] == hashlib.sha256((controlled.out / "cal.json").read_bytes()).hexdigest()
    first = controlled.data["findings"][0]["calibration"]
    assert first["summary"].startswith("0 of 3 independent models called found (0.0%; exact one-sided 95% upper")
    html = controlled.html.read_text()
    section = html[html.index('id="calibration"') :]
    assert "<b>0 of 3</b>" in section and "95% upper bound" in section and row["calibration"]["sha256"] in section


def test_an_innocent_suspect_stays_not_found_beside_a_claimed_control(
    controlled: SimpleNamespace, run_cli: Callable[..., Any]
) -> None:
    missing = controlled.out / "no-such-model.pt"
    code, stdout, stderr = run_cli("audit", controlled.independent, "--bundle", controlled.bundle, "--control",
                                   controlled.copy, "--control", missing, "--json")  # fmt: skip
    assert code == EXIT_NOT_FOUND
    data = json.loads(stdout)
    assert data["verdict"] == "not-detected" and data["controls"]["detected"] == ["copy-of-owner.safetensors"]
    failed = data["controls"]["models"][1]
    assert (failed["verdict"], failed["exit_code"], failed["sha256"]) == ("error", 4, None)
    assert failed["error"] == f"{controlled.out / 'no-such-model.pt'}: no such file or folder"
    assert data["controls"]["failed"] == ["no-such-model.pt"]
    assert f"warning: control {controlled.out / 'no-such-model.pt'}: not audited (exit 4)" in stderr


def test_without_controls_the_block_is_null(gr_reports: dict[str, Any]) -> None:
    data = json.loads(gr_reports["json"].read_text())
    assert data["controls"] is None
    assert 'id="control-warning"' not in gr_reports["html"].read_text()


@pytest.mark.slow
def test_a_hufunet_audit_gets_the_shipped_rate_and_an_independent_host_as_control(
    hufunet_owner: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    from safetensors.torch import save_file

    from auditor.toolkit import models as zoo

    host = zoo.build("cnn", width=2, seed=3)
    save_file({k: v.contiguous() for k, v in host.state_dict().items()}, str(tmp_path / "host.safetensors"))
    bundle = hufunet_owner.out / "owner_bundle.json"
    code, stdout, stderr = run_cli("audit", hufunet_owner.model_file, "--bundle", bundle, "--control",
                                   tmp_path / "host.safetensors", "--json")  # fmt: skip
    assert code == EXIT_OK, stderr
    data = json.loads(stdout)
    [row] = data["calibration"]
    assert row["detector"] == "hufunet" and row["calibration"]["file"] == "cnn-width2.json"
    assert row["calibration"]["shipped"] and row["false_positives"]["decided"] == 60
    assert data["findings"][0]["calibration"]["summary"].startswith("0 of 60 independent models called found")
    [control] = data["controls"]["models"]
    assert control["verdict"] == "not-detected" and data["controls"]["detected"] == []
    assert control["findings"][0]["value"] > data["findings"][0]["metrics"]["log10_binomial_p"]
