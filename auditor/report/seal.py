"""The evidence report's seal: content hashes, an optional signature, and their check.

A report (or a batch summary) is a JSON object whose ``integrity`` block seals
everything else in it:

* ``content_sha256``: SHA-256 of the canonical JSON (keys sorted, no spaces,
  :func:`auditor.bundle.canonical_json`) of the document without ``integrity``;
  it covers the run block (case id, analyst, date) too;
* ``evidence_sha256``: the same without the ``run`` block as well, so two runs
  of the same audit give the same value whoever ran it and when;
* ``html_sha256``: SHA-256 of the bytes of the HTML rendering, or ``None``;
* ``signature`` (optional): the signer's signature of the *statement*, the
  canonical JSON of the three hashes and the document's format, with the
  public key it verifies under and that key's fingerprint.

The hashes are over content, not layout: re-indenting the JSON does not break
them; changing any value, key or list order does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditor import keys
from auditor.bundle import canonical_json
from auditor.errors import InputError
from auditor.jsondata import DuplicateKeyError, unique_keys

__all__ = [
    "INTEGRITY",
    "MAX_REPORT_BYTES",
    "RUN",
    "VerifyResult",
    "content_sha256",
    "evidence_sha256",
    "read_report",
    "seal",
    "signer",
    "verify_document",
    "verify_report",
]

INTEGRITY = "integrity"
RUN = "run"
#: A report is a few hundred kilobytes; a file far larger is refused before it is read whole.
MAX_REPORT_BYTES = 256 << 20


def _sha(data: Any) -> str:
    return hashlib.sha256(canonical_json(data)).hexdigest()


def content_sha256(document: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``document`` without its integrity block."""
    return _sha({k: v for k, v in document.items() if k != INTEGRITY})


def evidence_sha256(document: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``document`` without its run and integrity blocks."""
    return _sha({k: v for k, v in document.items() if k not in (INTEGRITY, RUN)})


def _statement(document_format: str, integrity: dict[str, Any]) -> bytes:
    return canonical_json(
        {
            "content_sha256": integrity.get("content_sha256"),
            "evidence_sha256": integrity.get("evidence_sha256"),
            "html_sha256": integrity.get("html_sha256"),
            "report_format": document_format,
        }
    )


def seal(document: dict[str, Any], *, html: bytes | None = None, key: keys.PrivateKey | None = None) -> dict[str, Any]:
    """The integrity block of ``document`` (which must not hold one yet): hashes and, with ``key``, a signature."""
    integrity: dict[str, Any] = {
        "algorithm": "sha256-canonical-json",
        "content_sha256": content_sha256(document),
        "evidence_sha256": evidence_sha256(document),
        "html_sha256": None if html is None else hashlib.sha256(html).hexdigest(),
        "signature": None,
    }
    if key is not None:
        integrity["signature"] = {
            "algorithm": keys.signature_algorithm(key),
            "public_key": keys.public_pem(key),
            "public_key_sha256": keys.fingerprint(key),
            "value": base64.b64encode(keys.sign(key, _statement(document["report_format"], integrity))).decode(),
        }
    return integrity


def signer(key: keys.PrivateKey | None) -> dict[str, str] | None:
    """What the HTML may show of the signer before the signature exists: algorithm and fingerprint."""
    if key is None:
        return None
    return {"algorithm": keys.signature_algorithm(key), "public_key_sha256": keys.fingerprint(key)}


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify_document`: ``intact`` and one line saying why."""

    intact: bool
    message: str
    signed: bool = False
    fingerprint: str = ""


def _check_signature(
    document: dict[str, Any], integrity: dict[str, Any], public_key: keys.PublicKey | None
) -> VerifyResult:
    sig = integrity.get("signature")
    if sig is None:
        if public_key is not None:
            return VerifyResult(False, "the report is not signed, but a public key was given to check its signature")
        return VerifyResult(True, "content intact (not signed)")
    if not isinstance(sig, dict) or not all(isinstance(sig.get(k), str) for k in ("public_key", "value")):
        return VerifyResult(False, "the signature block is malformed", signed=True)
    try:
        embedded = keys.load_public_key(sig["public_key"])
        value = base64.b64decode(sig["value"], validate=True)
    except (InputError, binascii.Error, ValueError):
        return VerifyResult(False, "the signature block is malformed", signed=True)
    fingerprint = keys.fingerprint(embedded)
    if sig.get("public_key_sha256") != fingerprint:
        return VerifyResult(False, "the signer's fingerprint does not match the public key in the report", True)
    if public_key is not None and keys.fingerprint(public_key) != fingerprint:
        return VerifyResult(
            False,
            f"signed by key {fingerprint}, not by the given key {keys.fingerprint(public_key)}",
            True,
            fingerprint,
        )
    if not keys.verify(public_key or embedded, value, _statement(str(document.get("report_format")), integrity)):
        return VerifyResult(False, "the signature does not verify", True, fingerprint)
    checked = "the given key" if public_key is not None else "the key in the report only (give --public-key)"
    return VerifyResult(True, f"content intact, signature valid ({checked}; signer {fingerprint})", True, fingerprint)


def verify_document(
    document: Any, *, public_key: keys.PublicKey | None = None, html: bytes | None = None
) -> VerifyResult:
    """Recompute ``document``'s hashes and check its signature (required when ``public_key`` is given)
    and, with ``html``, that the HTML rendering is the one sealed."""
    if not isinstance(document, dict) or not isinstance(document.get(INTEGRITY), dict):
        return VerifyResult(False, "not a sealed auditor report: it has no integrity block")
    integrity = document[INTEGRITY]
    try:
        content, evidence = content_sha256(document), evidence_sha256(document)
    except (TypeError, ValueError):
        return VerifyResult(False, "the report holds values canonical JSON cannot hold")
    if integrity.get("content_sha256") != content:
        return VerifyResult(False, "altered: the content does not match its recorded SHA-256")
    if integrity.get("evidence_sha256") != evidence:
        return VerifyResult(False, "altered: the evidence does not match its recorded SHA-256")
    if html is not None:
        recorded = integrity.get("html_sha256")
        if recorded is None:
            return VerifyResult(False, "the report records no HTML rendering to check")
        if hashlib.sha256(html).hexdigest() != recorded:
            return VerifyResult(False, "altered: the HTML does not match the SHA-256 the report records")
    return _check_signature(document, integrity, public_key)


def read_report(path: Path) -> Any:
    """A report's JSON, read as hostile input: size-capped, strict UTF-8 and JSON, no repeated keys."""
    from auditor.safeio import read_small_file

    data = read_small_file(Path(path), limit=MAX_REPORT_BYTES, what="a report")
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=unique_keys, parse_constant=_refuse)
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text (bad byte at offset {exc.start}): damaged or altered") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON, damaged or altered: {exc.msg} (line {exc.lineno})") from None
    except DuplicateKeyError as exc:
        raise InputError(path, f"the key {exc.key[:60]!r} appears twice in one object: altered") from None
    except (ValueError, RecursionError) as exc:
        raise InputError(path, f"not valid JSON for auditor: {exc}") from None


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None


def verify_report(path: Path, *, public_key: Path | None = None, html: Path | None = None) -> VerifyResult:
    """:func:`verify_document` on the report file ``path``; ``public_key`` is a PEM file, ``html`` the
    rendering to check. Raises :class:`InputError` for files that cannot be read or parsed."""
    key = None
    if public_key is not None:
        try:
            key = keys.load_public_key(keys.read_key_file(public_key))
        except InputError as exc:
            raise InputError(public_key, exc.problem) from None
    return verify_document(read_report(path), public_key=key, html=None if html is None else _read_bytes(html))
