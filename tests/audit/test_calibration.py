"""Known error rates: the exact Clopper-Pearson bound, the calibration file (made from three tiny independent
models end to end, and refused when malformed), and what a report says of a finding a calibration applies to."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from scipy import stats

from auditor.audit.calibration import (
    CALIBRATION_FORMAT,
    Calibration,
    binomial_cdf,
    clopper_pearson_upper,
    error_rate,
    error_rates,
    load_calibration,
)
from auditor.errors import EXIT_INPUT, EXIT_OK, EXIT_USAGE, InputError
from auditor.findings import Finding, Verdict

SHA = "ab" * 32


@pytest.mark.parametrize(("k", "n"), [(0, 1), (0, 3), (0, 60), (1, 60), (2, 20), (5, 100), (19, 20), (37, 250)])
def test_clopper_pearson_upper_bound_is_the_beta_quantile(k: int, n: int) -> None:
    expected = stats.beta.ppf(0.95, k + 1, n - k)
    assert clopper_pearson_upper(k, n) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert clopper_pearson_upper(k, n, 0.99) == pytest.approx(stats.beta.ppf(0.99, k + 1, n - k), rel=1e-9)


def test_zero_of_sixty_is_below_4_9_percent_and_all_positive_is_one() -> None:
    assert round(clopper_pearson_upper(0, 60), 4) == 0.0487
    assert clopper_pearson_upper(0, 60) == pytest.approx(1 - 0.05 ** (1 / 60))
    assert clopper_pearson_upper(7, 7) == 1.0
    with pytest.raises(ValueError, match="need 0 <= k <= n"):
        clopper_pearson_upper(3, 2)
    with pytest.raises(TypeError):
        clopper_pearson_upper(True, 2)  # type: ignore[arg-type]


@pytest.mark.parametrize(("k", "n", "p"), [(0, 10, 0.3), (3, 10, 0.3), (10, 1000, 0.02), (1, 5000, 1e-4)])
def test_binomial_cdf_matches_scipy(k: int, n: int, p: float) -> None:
    assert binomial_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-10)


def test_error_rate_counts_detections_among_the_decided() -> None:
    rate = error_rate(["not-detected", "detected", "inconclusive", "error"])
    assert (rate["false_positives"], rate["decided"], rate["errors"]) == (1, 3, 1)
    assert rate["rate"] == pytest.approx(1 / 3)
    assert rate["upper_bound"] == pytest.approx(stats.beta.ppf(0.95, 2, 2))
    assert error_rate(["error"])["upper_bound"] is None


# --- a calibration made end to end from three tiny independent models -----------------------------------


@pytest.fixture(scope="module")
def three(
    gr_owner: SimpleNamespace,
    clean_model: Callable[..., Path],
    run_cli: Callable[..., Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> SimpleNamespace:
    """Three untrained SmallCNNs (seeds 11, 12, 13) calibrated against the Greedy Residuals owner's bundle."""
    out = tmp_path_factory.mktemp("calibration")
    models = out / "models"
    models.mkdir()
    paths = [clean_model(models / f"m{seed}.safetensors", seed=seed) for seed in (11, 12, 13)]
    bundle = gr_owner.out / "owner_bundle.json"
    result = run_cli("calibrate", "--bundle", bundle, "--models", models, "--out", out / "cal.json", "--name", "three")
    return SimpleNamespace(result=result, paths=paths, bundle=bundle, file=out / "cal.json", out=out)


def test_calibrate_writes_the_null_distribution_of_the_deciding_statistic(
    three: SimpleNamespace, run_cli: Callable[..., Any]
) -> None:
    assert three.result.code == EXIT_OK, three.result.stderr
    doc = json.loads(three.file.read_text())
    assert set(doc) == {"calibration_format", "calibration_version", "name", "tool", "command", "made", "bundle",
                        "reference", "models", "detectors"}  # fmt: skip
    assert (doc["calibration_format"], doc["calibration_version"], doc["name"]) == (CALIBRATION_FORMAT, 1, "three")
    assert doc["bundle"] == {"name": "owner_bundle.json", "scheme": "greedy-residuals",
                             "sha256": hashlib.sha256(three.bundle.read_bytes()).hexdigest()}  # fmt: skip
    assert doc["made"]["how"] == "supplied" and doc["reference"] is None
    assert [m["name"] for m in doc["models"]] == ["m11.safetensors", "m12.safetensors", "m13.safetensors"]
    assert [m["sha256"] for m in doc["models"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in three.paths]
    [entry] = doc["detectors"]
    assert (entry["detector"], entry["scheme"], entry["statistic"]) == (
        "greedy-residuals", "greedy-residuals", "log10_combined_p",
    )  # fmt: skip
    assert entry["options"]["p_threshold"] == 1e-6
    # Each value is exactly the deciding number an audit of that model reports.
    for path, value, verdict in zip(three.paths, entry["values"], entry["verdicts"], strict=True):
        _, stdout, _ = run_cli("audit", path, "--bundle", three.bundle, "--json")
        [finding] = json.loads(stdout)["findings"]
        assert (value, verdict) == (finding["metrics"]["log10_combined_p"], finding["verdict"])
        assert verdict == "not-detected" and -3 < value <= 0
    rate = entry["false_positive_rate"]
    assert (rate["false_positives"], rate["decided"], rate["errors"]) == (0, 3, 0)
    assert rate["upper_bound"] == pytest.approx(1 - 0.05 ** (1 / 3))
    assert doc["command"].startswith("auditor calibrate --bundle ")
    assert f"wrote {three.file}  sha256 {hashlib.sha256(three.file.read_bytes()).hexdigest()}" in three.result.stdout


def test_calibrate_trains_independent_models_when_asked(
    gr_owner: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    bundle = gr_owner.out / "owner_bundle.json"
    args = ("calibrate", "--bundle", bundle, "--models", tmp_path / "trained", "--out", tmp_path / "cal.json")
    code, _, stderr = run_cli(*args, "--train", "2", "--epochs", "1", "--first-seed", "7", "--json")
    assert code == EXIT_OK, stderr
    doc = json.loads((tmp_path / "cal.json").read_text())
    made = doc["made"]
    assert (made["how"], made["architecture"], made["width"], made["seeds"]) == ("trained", "cnn", 1, [7, 8])
    assert made["recipe"] == {"epochs": 1, "lr": 0.01, "batch_size": 64, "optimizer": "adam", "device": "cpu"}
    files = sorted((tmp_path / "trained").iterdir())
    assert [f.name for f in files] == ["independent-00007.safetensors", "independent-00008.safetensors"]
    assert [m["sha256"] for m in doc["models"]] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert all(0 <= m["test_accuracy"] <= 1 and m["seed"] in (7, 8) for m in doc["models"])
    assert "--train 2 --first-seed 7 --arch cnn --width 1 --epochs 1" in doc["command"]
    # The folder now holds models: training into it again is refused, nothing overwritten.
    code, _, stderr = run_cli(*args, "--train", "1")
    assert code == EXIT_USAGE and stderr.startswith("error: ") and "new or empty folder" in stderr


def test_calibrate_refuses_bad_inputs_in_one_line(
    three: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    models = three.paths[0].parent
    code, _, stderr = run_cli("calibrate", "--bundle", tmp_path / "none.json", "--models", models, "--out",
                              tmp_path / "c.json")  # fmt: skip
    assert code == EXIT_INPUT and stderr.count("\n") == 1 and "none.json" in stderr
    code, _, stderr = run_cli("calibrate", "--bundle", three.bundle, "--models", tmp_path / "absent", "--out",
                              tmp_path / "c.json")  # fmt: skip
    assert code == EXIT_USAGE and "must name a folder" in stderr
    code, _, stderr = run_cli("calibrate", "--bundle", three.bundle, "--models", models, "--out", models / "c.json")
    assert code == EXIT_USAGE and "outside the --models folder" in stderr
    assert not (models / "c.json").exists()


# --- a calibration file handed to auditor is hostile ---------------------------------------------------


def _document(verdicts: list[str], values: list[float | None]) -> dict[str, Any]:
    return {
        "calibration_format": CALIBRATION_FORMAT, "calibration_version": 1, "name": "hand-made", "command": "",
        "made": {"how": "supplied", "description": "hand-made"},
        "bundle": {"sha256": SHA, "scheme": "greedy-residuals"},
        "reference": None, "models": [{"name": f"m{i}", "sha256": SHA} for i in range(len(verdicts))],
        "detectors": [{"detector": "greedy-residuals", "scheme": "greedy-residuals", "statistic": "log10_combined_p",
                       "values": values, "verdicts": verdicts, "options": {"p_threshold": 1e-6},
                       "false_positive_rate": error_rate(verdicts)}],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("{", "not valid JSON"),
        ('{"a": 1, "a": 2}', "the key 'a' appears twice"),
        ("[]", "not a valid calibration: the top level is not an object"),
        ('{"calibration_format": "x"}', 'its "calibration_format" is not "auditor-calibration"'),
        ('{"calibration_format": "auditor-calibration", "calibration_version": 9}', "made by a newer auditor"),
        ('{"x": NaN}', "NaN is not allowed"),
    ],
)
def test_malformed_calibrations_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "cal.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as caught:
        load_calibration(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_counts_that_do_not_match_the_verdicts_are_refused(tmp_path: Path) -> None:
    doc = _document(["not-detected", "detected"], [-0.1, -9.0])
    doc["detectors"][0]["false_positive_rate"]["false_positives"] = 0  # someone "improved" the rate
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="its false-positive count does not match its verdicts"):
        load_calibration(path)
    doc["detectors"][0]["values"] = [-0.1]
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="one value and one verdict per model"):
        load_calibration(path)


def test_audit_refuses_a_broken_calibration_before_reading_the_suspect(
    gr_owner: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    (tmp_path / "cal.json").write_text("{}")
    code, stdout, stderr = run_cli("audit", tmp_path / "missing-suspect.pt", "--bundle", gr_owner.out /
                                   "owner_bundle.json", "--calibration", tmp_path / "cal.json")  # fmt: skip
    assert code == EXIT_INPUT and stdout == ""
    assert stderr == f'error: {tmp_path / "cal.json"}: not a valid calibration: its "calibration_format" is not' \
        ' "auditor-calibration"\n'  # fmt: skip


# --- what a report says ----------------------------------------------------------------------------------


def _finding(log10_p: float, verdict: Verdict, bundle: str) -> Finding:
    finding = Finding(detector="greedy-residuals", scheme="greedy-residuals", verdict=verdict, summary="",
                      subject=f"{bundle[:12]} owner", metrics={"log10_combined_p": log10_p})  # fmt: skip
    finding.bundle = bundle
    return finding


def test_error_rates_compare_the_suspect_with_the_null_and_say_where_conditions_differ(
    gr_owner: SimpleNamespace,
) -> None:
    cal = Calibration(_document(["not-detected"] * 4, [-0.5, -2.0, -0.1, None]), "cd" * 32, Path("cal.json"))
    [row] = error_rates([_finding(-1.0, Verdict.NOT_DETECTED, gr_owner.bundle.sha256)], given=[cal],
                        bundles=[gr_owner.bundle], options={"greedy-residuals": {"p_threshold": 1e-9}},
                        reference=True)  # fmt: skip
    assert row["value"] == -1.0 and row["verdict"] == "not-detected"
    assert (row["false_positives"]["false_positives"], row["false_positives"]["decided"]) == (0, 4)
    assert row["null"] == {"values": 3, "strongest": -2.0, "at_least_as_strong": 1}
    assert row["calibration"]["sha256"] == "cd" * 32 and not row["calibration"]["shipped"]
    notes = " ".join(row["notes"])
    assert "another owner bundle" in notes  # the calibration's bundle is not this audit's
    assert "p_threshold=1e-06; this audit ran with p_threshold=1e-09" in notes
    assert "audited without a reference model" in notes


def test_a_given_calibration_that_applies_to_nothing_says_so(gr_owner: SimpleNamespace) -> None:
    cal = Calibration(_document(["detected", "not-detected"], [-9.0, -0.2]), "cd" * 32, Path("cal.json"))
    [row] = error_rates([], given=[cal], bundles=[], options={}, reference=False)
    assert row["verdict"] is None and row["value"] is None
    assert row["false_positives"]["false_positives"] == 1
    assert row["notes"] == [
        "No finding of the greedy-residuals detector in this audit: this calibration was not applied."
    ]


def test_a_builtin_bundle_naming_a_shipped_architecture_gets_its_calibration(gr_owner: SimpleNamespace) -> None:
    [row] = error_rates([_finding(-50.0, Verdict.DETECTED, gr_owner.bundle.sha256)], given=[],
                        bundles=[gr_owner.bundle], options={}, reference=False)  # fmt: skip
    cal = row["calibration"]
    assert cal["shipped"] and cal["file"] == "cnn.json" and cal["path"] is None
    assert row["false_positives"]["decided"] == cal["models"] >= 20
    assert row["null"]["at_least_as_strong"] == 0
    assert math.isclose(
        row["false_positives"]["upper_bound"],
        clopper_pearson_upper(row["false_positives"]["false_positives"], row["false_positives"]["decided"]),
    )


def test_a_third_party_detector_ships_a_calibration_through_the_contract(
    tmp_path: Path, plugin: Callable[..., Any], run_cli: Callable[..., Any], clean_model: Callable[..., Path]
) -> None:
    from auditor import hookimpl
    from auditor.bases import Detector
    from auditor.bundle import save_bundle

    shipped = tmp_path / "toy-shipped.json"

    class Toy(Detector):
        id = scheme = "toy-scheme"
        p_metric = "log10_p"

        def detect(self, suspect: Any, *, bundle: Any, context: Any) -> list[Finding]:
            detected = suspect.parameter_count % 2 == 1  # any rule will do; the numbers are the point
            return [Finding(detector=self.id, scheme=self.scheme, subject="toy",
                            verdict=Verdict.DETECTED if detected else Verdict.NOT_DETECTED, summary="toy",
                            metrics={"log10_p": -1.25})]  # fmt: skip

        def shipped_calibration(self, payload: Any) -> Path | None:
            return shipped if payload.get("architecture") == "toy-arch" else None

    class Plugin:
        @hookimpl
        def register_detectors(self, register: Callable[[Detector], None]) -> None:
            register(Toy())

    bundle = tmp_path / "toy_bundle.json"
    save_bundle(bundle, scheme="toy-scheme", payload={"architecture": "toy-arch"})
    models = tmp_path / "models"
    models.mkdir()
    for seed in (1, 2):
        clean_model(models / f"m{seed}.safetensors", seed=seed)
    with plugin(Plugin()):
        assert run_cli("calibrate", "--bundle", bundle, "--models", models, "--out", shipped).code == EXIT_OK
        code, stdout, stderr = run_cli("audit", models / "m1.safetensors", "--bundle", bundle, "--json")
    assert code in (0, 1), stderr
    [row] = json.loads(stdout)["calibration"]
    assert (row["detector"], row["statistic"], row["value"]) == ("toy-scheme", "log10_p", -1.25)
    assert row["calibration"]["shipped"] and row["calibration"]["file"] == "toy-shipped.json"
    assert row["false_positives"]["decided"] == 2 and row["null"] == {"values": 2, "strongest": -1.25,
                                                                       "at_least_as_strong": 2}  # fmt: skip
