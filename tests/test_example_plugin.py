"""The example third-party detector, installed with pip, is listed and runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "auditor-example-detector"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package pip-installed into a folder of its own on the test's path."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
    )
    return target


def run_auditor(site: Path, *args: str, load: str | None = None) -> subprocess.CompletedProcess[str]:
    # A fresh interpreter: the entry point is under test, an installed distribution's ``auditor`` entry point
    # found at start-up on the interpreter's path, as a user's ``auditor`` would find it.
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("AUDITOR_LOAD_PLUGINS", None)
    if load is not None:
        env["AUDITOR_LOAD_PLUGINS"] = load
    return subprocess.run([sys.executable, "-m", "auditor", *args], env=env, capture_output=True, text=True)


def test_installed_example_is_listed(site: Path) -> None:
    result = run_auditor(site, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    example = rows["example_detector"]
    assert example["registers"] == {"detectors": ["example-non-finite"]}
    assert example["hooks"] == ["register_detectors"]
    assert "auditor-example-detector 0.1.0" in example["origin"]
    assert rows["auditor.formats.safetensors"]["origin"] == "built-in"


def test_installed_example_runs_in_an_audit(site: Path, tmp_path: Path) -> None:
    weights = {"fc.weight": torch.ones(3, 4), "fc.bias": torch.tensor([0.0, float("nan"), float("inf")])}
    model = tmp_path / "suspect.safetensors"
    save_file(weights, str(model))
    result = run_auditor(site, "audit", str(model), "--json", "--option", "example-non-finite.min_count=2")
    assert result.returncode == 3, result.stderr  # no owner bundle: nothing looked for, inconclusive
    report = json.loads(result.stdout)
    finding = {f["detector"]: f for f in report["findings"]}["example-non-finite"]
    assert finding["verdict"] == "inconclusive"
    assert finding["metrics"] == {"non_finite": 2, "weights": 15, "tensors_flagged": 1}
    assert finding["details"]["per_tensor"] == [{"name": "fc.bias", "non_finite": 2, "size": 3}]
    assert finding["explanation"].startswith("This check counts the weights that are not numbers")
    assert "--option example-non-finite.min_count=2" in report["command"]
    stricter = run_auditor(site, "audit", str(model), "--json", "--option", "example-non-finite.min_count=3")
    flagged = {f["detector"]: f for f in json.loads(stricter.stdout)["findings"]}["example-non-finite"]
    assert flagged["metrics"]["tensors_flagged"] == 0  # the option reached the installed plugin


def test_load_plugins_variable_restricts_loading(site: Path) -> None:
    names_none = {row["name"] for row in json.loads(run_auditor(site, "plugins", "--json", load="").stdout)}
    assert "example_detector" not in names_none
    assert "auditor.formats.safetensors" in names_none
    listed = run_auditor(site, "plugins", "--json", load="auditor-example-detector")
    assert "example_detector" in {row["name"] for row in json.loads(listed.stdout)}
