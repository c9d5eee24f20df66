"""The evidence report's content: determinism, no secrets, the restore log and the schemes' pictures."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from auditor import Detector, Finding, LayerGraph, Restorer, Verdict, hookimpl
from auditor.audit.pipeline import batch_exit_code
from auditor.bundle import load_bundle
from auditor.errors import EXIT_INCONCLUSIVE, EXIT_INPUT, EXIT_INTERNAL, EXIT_NOT_FOUND, EXIT_OK, EXIT_UNSAFE
from auditor.jsondata import jsonable
from auditor.report.batch import report_names
from auditor.report.guard import SecretGuard
from auditor.report.html import render_html
from auditor.report.text import AFTER_RESTORE, AS_GIVEN, UNVERIFIED_REFERENCE, power_of_ten

CASE_ID = "CASE-2025-0417"
ANALYST = "Dana Analyst"


def test_same_audit_twice_differs_only_in_the_run_block(
    gr_owner: SimpleNamespace, tmp_path: Path, audit: Callable[..., Any]
) -> None:
    args = [gr_owner.files["safetensors"], "--bundle", gr_owner.out / "owner_bundle.json"]
    args += ["--case-id", CASE_ID, "--analyst", ANALYST]
    _, first, first_html = audit(*args, tmp_path / "one")
    _, second, second_html = audit(*args, tmp_path / "two")
    assert first["integrity"]["evidence_sha256"] == second["integrity"]["evidence_sha256"]
    for data in (first, second):
        data["run"].pop("date")
        data.pop("integrity")
    assert first == second
    placeholders = []
    for page, path in ((first_html, tmp_path / "one"), (second_html, tmp_path / "two")):
        sealed = json.loads((path / "report.json").read_text())
        date, content = sealed["run"]["date"], sealed["integrity"]["content_sha256"]
        placeholders.append(page.replace(date, "DATE").replace(content, "HASH"))
    assert placeholders[0] == placeholders[1]
    assert "DATE" in placeholders[0] and "HASH" in placeholders[0]


def test_jsonable_is_independent_of_insertion_order() -> None:
    a = jsonable({"b": {3, 1, 2}, "a": (1.5, float("inf")), "c": {"y": 1, "x": [float("nan")]}})
    b = jsonable({"c": {"x": [float("nan")], "y": 1}, "a": [1.5, float("inf")], "b": {2, 3, 1}})
    assert json.dumps(a) == json.dumps(b) == '{"a": [1.5, "inf"], "b": [1, 2, 3], "c": {"x": ["nan"], "y": 1}}'


def _secret_strings(payload: Mapping[str, Any]) -> list[str]:
    section = payload["hufunet"]
    found = [section["hmac_key"], section["eph"]["data"], section["sph"]["weight"], section["sph"]["bias"]]
    assert all(isinstance(s, str) and len(s) >= 24 for s in found)
    return found


def test_hufunet_report_shows_no_secret(
    hufunet_owner: SimpleNamespace, tmp_path: Path, audit: Callable[..., Any]
) -> None:
    bundle = hufunet_owner.out / "owner_bundle.json"
    code, data, html = audit(hufunet_owner.model_file, "--bundle", bundle, tmp_path)
    assert code == EXIT_OK
    finding = next(f for f in data["findings"] if f["scheme"] == "hufunet")
    assert finding["verdict"] == "detected"
    assert set(data["bundles"][0]) == {
        "host_architecture", "name", "path", "released_model", "scheme", "secret", "sha256", "version",
    }  # fmt: skip
    text = json.dumps(data) + html + (tmp_path / "report.json").read_text()
    secrets = _secret_strings(load_bundle(bundle).payload)
    for secret in secrets:
        assert secret not in text
        assert secret[:16] not in text and secret[-16:] not in text
    for name in ('"hmac_key"', '"sph"', '"eph"'):
        assert name not in text
    # The pictures and numbers a reader needs are there.
    assert "Accuracy of the rebuilt HufuNet" in html
    assert f"Acc_combined {finding['metrics']['acc_combined']:.2%}" in html
    assert f"threshold {finding['metrics']['acc_original'] * (1 - finding['metrics']['tau_acc']):.1%}" in html
    # Its binomial p-value is far below the smallest float: null in JSON (never 0 or 5e-324), its exact log10
    # beside it, and a power of ten on the page.
    metrics = finding["metrics"]
    assert metrics["binomial_p"] is None and metrics["log10_binomial_p"] < -308
    assert '"binomial_p": null' in (tmp_path / "report.json").read_text()
    assert "5e-324" not in json.dumps(data)
    row = re.search(r'mono">binomial_p</span></th><td[^>]*>([^<]+)</td>', html)
    assert row is not None and row.group(1) == power_of_ten(metrics["log10_binomial_p"])
    assert finding["measured_on"] == AS_GIVEN and "holding the secret bundle is the claim" in html


def test_a_detector_that_leaks_a_secret_is_withheld(
    hufunet_owner: SimpleNamespace, tmp_path: Path, audit: Callable[..., Any], plugin: Callable[..., Any]
) -> None:
    key = load_bundle(hufunet_owner.out / "owner_bundle.json").payload["hufunet"]["hmac_key"]

    class Leaky(Detector):
        id = "test-leaky"
        scheme = "hufunet"
        description = "quotes the owner's key"

        def detect(self, suspect: LayerGraph, *, bundle: Any, context: Mapping[str, Any]) -> list[Finding]:
            leak = bundle.payload["hufunet"]["hmac_key"][2:30]
            return [Finding(detector=self.id, scheme=self.scheme, verdict=Verdict.DETECTED,
                            summary=f"key fragment {leak}", details={"raw": [leak]})]  # fmt: skip

    class Plugin:
        @hookimpl
        def register_detectors(self, register: Any) -> None:
            register(Leaky())

    with plugin(Plugin(), "test-leaky"):
        _, data, html = audit(hufunet_owner.model_file, "--bundle", hufunet_owner.out / "owner_bundle.json", tmp_path)
    leaky = next(f for f in data["findings"] if f["detector"] == "test-leaky")
    assert leaky["withheld"] is True and leaky["details"] == {} and "withheld" in leaky["summary"]
    assert key[2:30] not in html + json.dumps(data)


def test_secret_guard_finds_pieces_but_not_public_hashes() -> None:
    payload = {"k": "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=", "h": "ab" * 32, "f": "model.safetensors", "w": "Abc" * 9}
    bundle = SimpleNamespace(secret=True, payload=payload)
    guard = SecretGuard([bundle])  # type: ignore[list-item]
    assert guard.leaks({"x": "prefix SktMTU5PUFFSU1RVVldY suffix"})
    assert not guard.leaks({"x": "ab" * 32, "y": "model.safetensors", "z": "QUJDREVGR0hJSkt", "w": "Abc" * 9})
    assert not SecretGuard([SimpleNamespace(secret=False, payload=bundle.payload)]).leaks(bundle.payload)  # type: ignore[list-item]


class Broken(Restorer):
    id = "test-broken"
    order = 6
    description = "always fails"

    def restore(self, suspect: LayerGraph, reference: LayerGraph) -> tuple[LayerGraph, dict[str, Any]]:
        raise ValueError("no luck")


def test_restore_log_gets_a_table_and_pictures(
    gr_owner: SimpleNamespace,
    tmp_path: Path,
    audit: Callable[..., Any],
    clean_model: Callable[..., Any],
    plugin: Callable[..., Any],
    aligner: Restorer,
) -> None:
    class Plugin:
        @hookimpl
        def register_restorers(self, register: Any) -> None:
            register(aligner)
            register(Broken())

    reference = gr_owner.files["safetensors"]
    suspect = clean_model(tmp_path / "suspect.safetensors")
    with plugin(Plugin(), "test-restorers"):
        _, data, html = audit(suspect, "--bundle", gr_owner.out / "owner_bundle.json", "--reference", reference,
                              tmp_path)  # fmt: skip
    entries = {e["restorer"]: e for e in data["restore"]["entries"]}
    assert entries["test-aligner"]["log"]["layers"][0]["similarity_after"] == 0.996
    assert entries["test-broken"] == {"restorer": "test-broken", "order": 6, "status": "error",
                                      "error": "ValueError: no luck"}  # fmt: skip
    assert data["reference"]["sha256"] == data["bundles"][0]["released_model"]["sha256"]
    assert f"--reference {reference}" in data["command"]
    assert "Similarity of each layer to the reference" in html
    assert html.count("Channel matching of layer") == 2
    assert "It failed and left the model as it was: ValueError: no luck" in html
    assert re.search(r"<td class=\"num\">0\.996</td>", html)


def test_no_reference_says_so(gr_reports: dict[str, Any]) -> None:
    html = gr_reports["html"].read_text()
    assert "No reference model was given" in html
    assert json.loads(gr_reports["json"].read_text())["restore"] == {"reference_given": False, "entries": []}


def test_report_names_are_distinct_and_safe() -> None:
    paths = [Path("a/m.pt"), Path("b/m.pt"), Path("m.pt-2"), Path("summary"), Path("../\x1bx y")]
    assert report_names(paths) == ["m.pt", "m.pt-2", "m.pt-2-2", "summary-2", "_x_y"]


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([EXIT_NOT_FOUND, EXIT_OK, EXIT_INCONCLUSIVE], EXIT_OK),
        ([EXIT_NOT_FOUND, EXIT_INCONCLUSIVE], EXIT_INCONCLUSIVE),
        ([EXIT_NOT_FOUND, EXIT_NOT_FOUND], EXIT_NOT_FOUND),
        ([EXIT_OK, EXIT_INPUT], EXIT_INPUT),
        ([EXIT_INPUT, EXIT_UNSAFE], EXIT_UNSAFE),
        ([EXIT_UNSAFE, EXIT_INTERNAL], EXIT_INTERNAL),
    ],
)
def test_batch_exit_code_is_the_most_serious(codes: list[int], expected: int) -> None:
    assert batch_exit_code(codes) == expected


def test_unknown_detectors_findings_are_shown_whole(
    gr_owner: SimpleNamespace, tmp_path: Path, audit: Callable[..., Any], plugin: Callable[..., Any]
) -> None:
    class Census(Detector):
        id = "test-census"
        scheme = ""
        description = "counts layers"

        def detect(self, suspect: LayerGraph, *, bundle: Any, context: Mapping[str, Any]) -> list[Finding]:
            kinds = {layer.kind.value for layer in suspect.layers}
            rows = [{"zeta": 1, "name": layer.name, "alpha": layer.parameter_count} for layer in suspect.layers]
            metrics = {"layers": len(rows), "share": 0.25}
            summary = f"{len(rows)} layers seen"
            details = {"kinds": kinds, "rows": rows}
            return [Finding(self.id, Verdict.INCONCLUSIVE, summary, metrics=metrics, details=details)]

    class Plugin:
        @hookimpl
        def register_detectors(self, register: Any) -> None:
            register(Census())

    with plugin(Plugin(), "test-census"):
        code, data, html = audit(gr_owner.files["safetensors"], tmp_path)
    assert code == EXIT_INCONCLUSIVE  # a bundle-free check never decides the verdict
    census = data["findings"][0]
    assert census["metrics"] == {"layers": 7, "share": 0.25}
    assert census["details"]["kinds"] == ["batch-norm", "conv2d", "linear"]  # a set, sorted
    assert census["explanation"].startswith("This finding comes from the detector 'test-census'")
    header = re.search(r"<h4>rows</h4>\s*<table><thead><tr>(.*?)</tr>", html, re.S)
    assert header and re.findall(r"<th scope=\"col\">(.*?)</th>", header.group(1)) == ["name", "alpha", "zeta"]


# --- the reference is checked ----------------------------------------------------------------------------


WARNING = 'id="reference-warning"'


def test_the_released_model_as_reference_is_verified(
    gr_owner: SimpleNamespace, tmp_path: Path, audit: Callable[..., Any]
) -> None:
    bundle, released = gr_owner.out / "owner_bundle.json", gr_owner.files["safetensors"]
    code, data, html = audit(released, "--bundle", bundle, "--reference", released, tmp_path)
    assert code == EXIT_OK
    check = data["reference_check"]
    assert check["verified"] is True and check["problems"] == [] and check["caveat"] == ""
    assert check["bundles"][0]["sha256"] == "matches" and check["bundles"][0]["architecture"] is None
    assert WARNING not in html and UNVERIFIED_REFERENCE not in html
    assert "The reference is the owner's released model" in html
    assert [f["measured_on"] for f in data["findings"]] == [AFTER_RESTORE, AFTER_RESTORE]  # watermark, lineage


def test_a_reference_that_is_not_the_released_model_is_stated_at_the_top(
    gr_owner: SimpleNamespace, tmp_path: Path, audit: Callable[..., Any], clean_model: Callable[..., Path]
) -> None:
    other = clean_model(tmp_path / "other.safetensors", seed=5)  # the owner's architecture, other weights
    code, data, html = audit(gr_owner.files["safetensors"], "--bundle", gr_owner.out / "owner_bundle.json",
                             "--reference", other, tmp_path / "out")  # fmt: skip
    assert code == EXIT_OK and data["verdict"] == "detected"  # the exit code is the verdict's, as before
    check = data["reference_check"]
    released = data["bundles"][0]["released_model"]["sha256"]
    assert check["verified"] is False and check["caveat"] == UNVERIFIED_REFERENCE
    assert check["bundles"][0]["sha256"] == "differs" and check["bundles"][0]["architecture"] is None
    assert check["problems"] == [
        f"the reference other.safetensors (SHA-256 {data['reference']['sha256']}) is not the model released"
        f" with owner bundle owner_bundle.json, whose SHA-256 is {released}"
    ]
    top = html[: html.index('<section class="run"')]  # the first screen
    assert WARNING in top and check["problems"][0] in top
    assert f"Verdict: watermark found, but {UNVERIFIED_REFERENCE}</h1>" in top
    assert "(unverified reference)</title>" in html


def test_a_reference_of_another_architecture_is_stated_at_the_top(
    gr_owner: SimpleNamespace, hufunet_owner: SimpleNamespace, tmp_path: Path, audit: Callable[..., Any]
) -> None:
    _, data, html = audit(gr_owner.files["safetensors"], "--bundle", gr_owner.out / "owner_bundle.json",
                          "--reference", hufunet_owner.model_file, tmp_path)  # fmt: skip
    check = data["reference_check"]
    why = check["bundles"][0]["architecture"]
    assert why == "it has no conv2d layer of shape 32x16x3x3 like the watermarked conv2"
    problem = f"owner bundle owner_bundle.json does not describe the reference's architecture: {why}"
    assert check["problems"][-1] == problem
    assert WARNING in html[: html.index('<section class="run"')] and why in html


# --- the first screen's hook for a measured false-positive rate ---------------------------------------------


def test_the_first_screen_shows_a_measured_false_positive_rate_when_the_finding_has_one(
    gr_reports: dict[str, Any],
) -> None:
    """A hand-made document: the sealed report's data with a calibration given to its finding."""
    document = json.loads(gr_reports["json"].read_text())
    document.pop("integrity")
    seal = {"content_sha256": "0" * 64, "evidence_sha256": "1" * 64, "signer": None}

    def first_screen(doc: dict[str, Any]) -> str:
        page = render_html(doc, template="report.html.j2", seal=seal)
        return " ".join(page[: page.index('<section class="run"')].split())

    finding = document["findings"][0]
    finding.pop("calibration", None)
    assert "Measured false-positive rate" not in first_screen(document)
    finding["calibration"] = {"false_positives": 0, "n": 60, "upper_bound": 0.0487, "source": "cnn-digits-60"}
    shown = first_screen(document)
    strength = shown[shown.index("How strong") : shown.index("Under which null")]
    assert power_of_ten(finding["first_screen"]["log10_p"]) in strength
    assert (
        "Measured false-positive rate: 0 of 60 independent models called found (95% upper bound 4.87%);"
        " calibration set: cnn-digits-60." in strength
    )
    finding["calibration"]["summary"] = "0 of 60 (calibration set A; exact one-sided 95% upper bound 4.9%)"
    assert "Measured false-positive rate: 0 of 60 (calibration set A;" in first_screen(document)


def test_a_batch_summary_states_an_unverified_reference(
    gr_owner: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any], clean_model: Callable[..., Path]
) -> None:
    other = clean_model(tmp_path / "other.safetensors", seed=5)
    suspects = [gr_owner.files["safetensors"], clean_model(tmp_path / "clean.safetensors")]
    out = tmp_path / "reports"
    code, _, stderr = run_cli("audit", *suspects, "--bundle", gr_owner.out / "owner_bundle.json",
                              "--reference", other, "--out", out)  # fmt: skip
    assert code == EXIT_OK, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference_check"]["verified"] is False
    assert summary["reference_check"]["bundles"][0]["sha256"] == "differs"
    assert WARNING in (out / "summary.html").read_text()
    for name in ("model.safetensors", "clean.safetensors"):
        assert json.loads((out / f"{name}.json").read_text())["reference_check"] == summary["reference_check"]
