"""OpenSSF model-signing signatures that come with a suspect or reference: signed with a key made here,
verified offline, reported under the model's block and, when they fail, at the top of the report."""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from auditor.audit import provenance
from auditor.errors import EXIT_INPUT, EXIT_USAGE

ASSETS = Path(__file__).resolve().parent.parent / "assets"
INCONCLUSIVE = 3  # no bundle given: the verdict never depends on provenance


def _ec_keys(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / "signer.pem", folder / "signer.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return private, public


@pytest.fixture
def signed(tmp_path: Path) -> dict[str, Path]:
    """A model file signed offline with model_signing and an elliptic-curve key made here (FILE.sig)."""
    from model_signing import signing

    model = Path(shutil.copy(ASSETS / "st_cnn.safetensors", tmp_path / "model.safetensors"))
    private, public = _ec_keys(tmp_path)
    signing.Config().use_elliptic_key_signer(private_key=private).sign(model, tmp_path / "model.safetensors.sig")
    return {"model": model, "public": public, "out": tmp_path / "out"}


def _audit(run_cli: Callable[..., Any], model: Path, out: Path, *args: Any) -> tuple[int, dict[str, Any], str, str]:
    code, _, stderr = run_cli("audit", model, "--out", out / "r.html", *args)
    return code, json.loads((out / "r.json").read_text()), (out / "r.html").read_text(), stderr


def test_a_key_signed_model_verifies(signed: dict[str, Path], run_cli: Callable[..., Any]) -> None:
    code, report, html, stderr = _audit(run_cli, signed["model"], signed["out"], "--model-signer-key", signed["public"])
    assert code == INCONCLUSIVE and "warning" not in stderr
    p = report["suspect"]["provenance"]
    assert (p["kind"], p["status"]) == ("key", "verified")
    assert p["message"].startswith("verified: signed by key ") and "every file matches its manifest" in p["message"]
    assert report["provenance_alerts"] == [] and 'id="provenance-warning"' not in html
    assert "Model-signing signature</b> (key-based" in html


def test_an_altered_model_fails_at_the_top(signed: dict[str, Path], run_cli: Callable[..., Any]) -> None:
    data = bytearray(signed["model"].read_bytes())
    data[-1] ^= 1
    signed["model"].write_bytes(bytes(data))
    code, report, html, stderr = _audit(run_cli, signed["model"], signed["out"], "--model-signer-key", signed["public"])
    assert code == INCONCLUSIVE  # provenance never changes the verdict or exit code
    p = report["suspect"]["provenance"]
    assert p["status"] == "failed"
    assert "do not match the manifest the signature covers" in p["message"]
    assert stderr.startswith("warning: the suspect's model-signing signature does not verify: FAILED")
    assert len([line for line in stderr.splitlines() if not line.startswith("note: ")]) == 1  # one warning line
    assert html.index('id="provenance-warning"') < html.index('id="findings"')


def test_another_key_fails(signed: dict[str, Path], run_cli: Callable[..., Any], tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    _, other = _ec_keys(tmp_path / "other")
    _, report, _, _ = _audit(run_cli, signed["model"], signed["out"], "--model-signer-key", other)
    p = report["suspect"]["provenance"]
    assert p["status"] == "failed" and "signed with another key than --model-signer-key" in p["message"]


def test_without_a_key_it_is_present_not_verified(signed: dict[str, Path], run_cli: Callable[..., Any]) -> None:
    _, report, html, stderr = _audit(run_cli, signed["model"], signed["out"])
    p = report["suspect"]["provenance"]
    assert p["status"] == "not verified" and "give it with --model-signer-key" in p["message"]
    assert "warning" not in stderr and report["provenance_alerts"] == [] and "the signer it names (unverified)" in html


def test_a_model_without_signature_says_so(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    model = shutil.copy(ASSETS / "st_cnn.safetensors", tmp_path / "m.safetensors")
    _, report, html, _ = _audit(run_cli, Path(model), tmp_path / "out")
    assert report["suspect"]["provenance"] is None
    assert "No model-signing signature (model.sig or FILE.sig) came with this model." in html


def _certificate(email: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sigstore-intermediate")])
    now = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(7).not_valid_before(now).not_valid_after(now + dt.timedelta(minutes=10))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.DER)


def test_a_keyless_signature_needs_the_network(tmp_path: Path) -> None:
    """Sigstore keyless: the certificate's identity is shown as claimed, never as verified (no network)."""
    model = Path(shutil.copy(ASSETS / "st_cnn.safetensors", tmp_path / "m.safetensors"))
    bundle = {
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {
            "certificate": {"rawBytes": base64.b64encode(_certificate("owner@example.org")).decode()},
            "tlogEntries": [{"logIndex": "1"}],
        },
        "dsseEnvelope": {"payload": "", "payloadType": "application/vnd.in-toto+json", "signatures": []},
    }
    (tmp_path / "model.sig").write_text(json.dumps(bundle))
    p = provenance.check(model, signer_key=None)
    assert p is not None and (p["kind"], p["status"]) == ("sigstore", "not verified")
    assert p["message"].startswith("present, not verified: needs network/trust root")
    assert p["claimed_signer"] == "owner@example.org"


@pytest.mark.parametrize("content", [b"not json", b'{"a": 1, "a": 2}', b"[]", b'{"verificationMaterial": 3}'])
def test_an_unreadable_signature_is_exit_4(tmp_path: Path, run_cli: Callable[..., Any], content: bytes) -> None:
    model = shutil.copy(ASSETS / "st_cnn.safetensors", tmp_path / "m.safetensors")
    (tmp_path / "m.safetensors.sig").write_bytes(content)
    code, _, stderr = run_cli("audit", model, "--out", tmp_path / "out" / "r.html")
    assert code == EXIT_INPUT and stderr.count("\n") == 1
    assert stderr.startswith(f"error: {tmp_path / 'm.safetensors.sig'}: not readable as a model-signing signature")


def test_the_signer_key_goes_with_one_suspect(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    _, public = _ec_keys(tmp_path)
    code, _, stderr = run_cli("audit", ASSETS / "st_cnn.safetensors", ASSETS / "pt_clean.pt",
                              "--model-signer-key", public)  # fmt: skip
    assert code == EXIT_USAGE and "--model-signer-key applies to one suspect" in stderr
