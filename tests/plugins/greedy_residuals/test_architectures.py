"""Every built-in architecture can be watermarked by the embedder and audited from its files."""

from __future__ import annotations

from pathlib import Path

import pytest

from auditor import keys
from auditor.audit.detect import run_detectors
from auditor.audit.load import load_model
from auditor.bundle import load_bundle
from auditor.findings import Verdict
from auditor.plugins.greedy_residuals.embedder import embed_greedy_residuals


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return keys.generate_keypair(tmp_path_factory.mktemp("keys"), algorithm="ed25519").private


# The LSTM runs with the embedder's defaults (every bit must be embedded); the ResNet,
# the slowest to train on two cores, with fewer epochs (the verdict must still hold).
@pytest.mark.slow
@pytest.mark.parametrize(("arch", "epochs", "min_rate"), [("lstm", None, 1.0), ("resnet", 6, 0.95)])
def test_embed_and_audit(key: Path, tmp_path: Path, arch: str, epochs: int | None, min_rate: float) -> None:
    options = {} if epochs is None else {"epochs": epochs}
    summary = embed_greedy_residuals(key=key, message=f"(c) {arch} owner", out_dir=tmp_path, arch=arch, **options)
    assert summary["test_accuracy"] >= 0.9, summary["test_accuracy"]
    assert summary["rates"] and min(summary["rates"].values()) >= min_rate, summary["rates"]
    bundle = load_bundle(tmp_path / "owner_bundle.json")
    for name in ("model.safetensors", "model.pt"):
        (finding,) = [f for f in run_detectors(load_model(tmp_path / name), bundles=[bundle]) if f.scheme]
        assert finding.verdict is Verdict.DETECTED, finding.summary
        assert {layer["found_by"] for layer in finding.details["layers"]} == {"by name"}
