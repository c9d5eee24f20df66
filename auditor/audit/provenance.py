"""Provenance that arrives with a model: an OpenSSF model-signing signature beside it, checked offline.

OpenSSF model signing (the ``model-signing`` package) writes a Sigstore bundle, by convention
``model.sig``, over a manifest of a model file's or folder's hashes. auditor looks for one beside each
suspect and reference (:func:`signature_file`) and says what it shows (:func:`check`):

* signed with a key (``verificationMaterial.publicKey``): verified with the public key the analyst
  gives (``--model-signer-key PEM``, an elliptic-curve key, as model signing uses); without one, or
  with a key of another kind, it is "present, not verified";
* signed with a certificate and no transparency-log entry, or keyless through Sigstore: the signer the
  certificate *claims* is shown, but it is "present, not verified: needs network/trust root", since
  verifying it needs Sigstore's trust root and transparency log (auditor never goes on the network) or
  the signer's certificate chain.

A signature that does not verify is stated at the top of the report; it never changes the verdict or
exit code (a model's provenance is a separate question from whose watermark it carries). The signature
file is hostile input: a regular file of at most :data:`MAX_SIGNATURE_BYTES`, strict JSON. Nothing here
imports torch; ``model_signing`` is imported only when a key-signed signature is to be verified.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

from auditor.errors import InputError
from auditor.jsondata import DuplicateKeyError, unique_keys

__all__ = ["MAX_SIGNATURE_BYTES", "SIGNATURE_NAME", "attach", "check", "signature_file"]

SIGNATURE_NAME = "model.sig"
#: A model-signing bundle holds a manifest of one hash per file: a few MiB even for many thousands of files.
MAX_SIGNATURE_BYTES = 16 << 20
NEEDS_NETWORK = "present, not verified: needs network/trust root"


def signature_file(model: Path) -> Path | None:
    """The model-signing signature that came with ``model``: ``FOLDER/model.sig`` for a folder, else
    ``FILE.sig`` or ``model.sig`` beside the file; ``None`` when there is none."""
    model = Path(model)
    candidates = [model / SIGNATURE_NAME] if model.is_dir() else [model.with_name(model.name + ".sig"),
                                                                  model.with_name(SIGNATURE_NAME)]  # fmt: skip
    return next((c for c in candidates if c.exists() or c.is_symlink()), None)


def _read_bundle(path: Path) -> dict[str, Any]:
    from auditor.safeio import read_small_file

    data = read_small_file(path, limit=MAX_SIGNATURE_BYTES, what="a model signature")
    try:
        bundle = json.loads(data.decode("utf-8"), object_pairs_hook=unique_keys)
    except (UnicodeDecodeError, DuplicateKeyError, RecursionError, ValueError):
        raise InputError(path, "not readable as a model-signing signature (not strict JSON)") from None
    if not isinstance(bundle, dict) or not isinstance(bundle.get("verificationMaterial"), dict):
        raise InputError(path, "not readable as a model-signing signature: no verificationMaterial")
    return bundle


def _certificate_claims(material: dict[str, Any]) -> str | None:
    """Who the signing certificate names (unverified): its subject alternative names, else its subject."""
    from cryptography import x509

    chain = material.get("x509CertificateChain")
    raw = (material.get("certificate") or {}).get("rawBytes") if isinstance(material.get("certificate"), dict) else None
    if raw is None and isinstance(chain, dict) and chain.get("certificates"):
        first = chain["certificates"][0]
        raw = first.get("rawBytes") if isinstance(first, dict) else None
    if not isinstance(raw, str):
        return None
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(raw, validate=True))
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            shown = [str(n.value) for n in names]
        except x509.ExtensionNotFound:
            shown = []
        return ", ".join(shown)[:300] or cert.subject.rfc4514_string()[:300]
    except (binascii.Error, ValueError, TypeError):
        return "an unreadable certificate"


def _verify_with_key(model: Path, signature: Path, key: Path) -> tuple[bool, str]:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from auditor.safeio import read_small_file

    pem = read_small_file(key, limit=1 << 20, what="a key file")
    try:
        public = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise InputError(key, "not a PEM public key") from None
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return False, "not verified: model signing uses elliptic-curve keys, and --model-signer-key is not one"
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    fingerprint = digest.finalize().hex()
    try:
        from model_signing import verifying
    except ImportError:
        return False, "not verified: the model-signing package is not installed (pip install 'auditor[provenance]')"
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=key).verify(model, signature)
    except Exception as exc:  # the library on hostile input: any failure is a signature that does not verify
        why = str(exc)
        if why.startswith("Signature mismatch"):
            why = "the model's files do not match the manifest the signature covers (altered since signing)"
        elif why.startswith("Key mismatch"):
            why = "signed with another key than --model-signer-key"
        else:
            why = f"{type(exc).__name__}: {why[:200]}"
        return False, f"FAILED: {why} (key {fingerprint})"
    return True, f"verified: signed by key {fingerprint} ({public.curve.name}); every file matches its manifest"


def check(model: Path, *, signer_key: Path | None = None) -> dict[str, Any] | None:
    """What the model-signing signature beside ``model`` shows, or ``None`` when there is none:
    ``{signature, kind, claimed_signer, status, message}``; ``status`` is ``"verified"``, ``"failed"`` or
    ``"not verified"``. Raises :class:`InputError` for a signature or key file that cannot be read."""
    signature = signature_file(model)
    if signature is None:
        return None
    bundle = _read_bundle(signature)
    material = bundle["verificationMaterial"]
    tlog = material.get("tlogEntries")
    entry: dict[str, Any] = {"signature": str(signature), "kind": "", "claimed_signer": None}
    if isinstance(material.get("publicKey"), dict):
        entry["kind"] = "key"
        hint = material["publicKey"].get("hint")
        entry["claimed_signer"] = f"a key (hint {str(hint)[:100]})" if hint else "a key"
        if signer_key is None:
            return entry | {
                "status": "not verified",
                "message": "present, not verified: signed with a key; give it with --model-signer-key",
            }
        ok, message = _verify_with_key(model, signature, signer_key)
        status = "verified" if ok else "failed" if message.startswith("FAILED") else "not verified"
        return entry | {"status": status, "message": message}
    entry["kind"] = "sigstore" if isinstance(tlog, list) and tlog else "certificate"
    entry["claimed_signer"] = _certificate_claims(material)
    return entry | {"status": "not verified", "message": f"{NEEDS_NETWORK} (the certificate's signer is as claimed)"}


def attach(document: dict[str, Any], *, suspect: Path, reference: Path | None, signer_key: Path | None) -> list[str]:
    """Add each model's ``provenance`` (:func:`check`; ``None`` without a signature) to the report's suspect
    and reference blocks; the lines to state at the top of the report: one per signature that failed."""
    alerts = []
    for role, block, path in (("suspect", document.get("suspect"), suspect),
                              ("reference", document.get("reference"), reference)):  # fmt: skip
        if not isinstance(block, dict) or path is None:
            continue
        block["provenance"] = check(path, signer_key=signer_key)
        if block["provenance"] is not None and block["provenance"]["status"] == "failed":
            alerts.append(f"the {role}'s model-signing signature does not verify: {block['provenance']['message']}")
    if signer_key is not None and all(
        not isinstance(document.get(r), dict) or document[r].get("provenance") is None for r in ("suspect", "reference")
    ):
        alerts.append("--model-signer-key was given, but neither the suspect nor the reference came with a"
                      f" model-signing signature ({SIGNATURE_NAME} or FILE.sig)")  # fmt: skip
    document["provenance_alerts"] = alerts
    return alerts
