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
