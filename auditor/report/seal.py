"""The evidence report's seal: content hashes, an optional signature, and their check.

A report (or a batch summary) is a JSON object whose ``integrity`` block seals
everything else in it:

* ``version``: the integrity format, :data:`INTEGRITY_VERSION` (2; a block
  without it is format 1, written before the signature covered its own labels);
* ``algorithm``: ``"sha256-canonical-json"``, how the hashes are computed;
* ``content_sha256``: SHA-256 of the canonical JSON (keys sorted, no spaces,
  :func:`auditor.bundle.canonical_json`) of the document without ``integrity``;
  it covers the run block (case id, analyst, date) too;
* ``evidence_sha256``: the same without the ``run`` block as well, so two runs
  of the same audit give the same value whoever ran it and when;
* ``html_sha256``: SHA-256 of the bytes of the HTML rendering, or ``None``;
* ``signature`` (optional): the signature ``algorithm``, the signer's
  ``public_key`` and its fingerprint ``public_key_sha256``, and ``value``, the
  signature of the *statement*: the canonical JSON of the document's format and
  of the whole integrity block but that value (:func:`statement`). Every field
  ``auditor report verify`` prints or relies on is covered.

The hashes are over content, not layout: re-indenting the JSON does not break
them; changing any value, key or list order does.

A report handed to ``verify`` is hostile input: it is read only if it is a
regular file of at most :data:`MAX_REPORT_BYTES`, strict UTF-8 and JSON with no
repeated key, no non-finite or oversized number, no number written otherwise
than auditor writes it, at most :data:`MAX_CONTAINERS` objects and lists and at
most :data:`MAX_DEPTH` levels deep; the HTML page it is checked against is hashed
as it is read, up to :data:`MAX_HTML_BYTES`. Anything else is an
:class:`~auditor.errors.InputError` ("not readable as a report", exit 4).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass
from itertools import compress, repeat
from pathlib import Path
from typing import Any

from auditor import keys
from auditor.bundle import BUNDLE_FORMAT, canonical_json
from auditor.errors import InputError
from auditor.jsondata import DuplicateKeyError, unique_keys

__all__ = [
    "INTEGRITY",
    "INTEGRITY_VERSION",
    "MAX_CONTAINERS",
    "MAX_DEPTH",
    "MAX_HTML_BYTES",
    "MAX_REPORT_BYTES",
    "RUN",
    "SEAL_ALGORITHM",
    "VerifyResult",
    "content_sha256",
    "evidence_sha256",
    "read_report",
    "seal",
    "signer",
    "statement",
    "verify_document",
    "verify_report",
]

INTEGRITY = "integrity"
RUN = "run"
#: The integrity format :func:`seal` writes; format 1 (no ``version`` field) is still verified.
INTEGRITY_VERSION = 2
SEAL_ALGORITHM = "sha256-canonical-json"
#: A report is a few hundred kilobytes and a batch summary about 1 KiB per suspect; with
#: :data:`MAX_CONTAINERS`, parsing and hashing a hostile file of this size stays well under 1 GB.
MAX_REPORT_BYTES = 32 << 20
#: The HTML page is hashed 1 MiB at a time, never held whole; the limit bounds the time.
MAX_HTML_BYTES = 256 << 20
#: Objects and lists in a report, counted from its ``[`` and ``{`` bytes before parsing (an upper bound):
#: an empty list costs Python 64 bytes for 3 bytes of JSON. Real reports hold a few thousand.
MAX_CONTAINERS = 1_000_000
#: Nesting of a report; real ones reach about ten levels.
MAX_DEPTH = 64
#: Integers auditor writes (sizes, counts, seeds) fit in 64 bits; JSON readers elsewhere lose more.
_INT_RANGE = (-(1 << 63), 1 << 64)
_FIELDS = {
    1: frozenset({"algorithm", "content_sha256", "evidence_sha256", "html_sha256", "signature"}),
    2: frozenset({"version", "algorithm", "content_sha256", "evidence_sha256", "html_sha256", "signature"}),
}
_SIGNATURE_FIELDS = frozenset({"algorithm", "public_key", "public_key_sha256", "value"})
#: Names what the signature is for, so that it cannot be taken for the key's signature of anything else.
_PURPOSE = "auditor report seal"


def _sha(data: Any) -> str:
    return hashlib.sha256(canonical_json(data)).hexdigest()


def content_sha256(document: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``document`` without its integrity block."""
    return _sha({k: v for k, v in document.items() if k != INTEGRITY})


def evidence_sha256(document: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``document`` without its run and integrity blocks."""
    return _sha({k: v for k, v in document.items() if k not in (INTEGRITY, RUN)})


def statement(document_format: str, integrity: dict[str, Any]) -> bytes:
    """The bytes the signature signs: the document's format and every integrity field but the signature's
    ``value`` (format 2), or, for format 1, the three hashes and the format."""
    if integrity.get("version", 1) == 1:
        return canonical_json(
            {
                "content_sha256": integrity.get("content_sha256"),
                "evidence_sha256": integrity.get("evidence_sha256"),
                "html_sha256": integrity.get("html_sha256"),
                "report_format": document_format,
            }
        )
    covered = {k: v for k, v in integrity.items() if k != "signature"}
    sig = integrity.get("signature")
    covered["signature"] = {k: v for k, v in sig.items() if k != "value"} if isinstance(sig, dict) else sig
    return canonical_json({"integrity": covered, "purpose": _PURPOSE, "report_format": document_format})


def seal(document: dict[str, Any], *, html: bytes | None = None, key: keys.PrivateKey | None = None) -> dict[str, Any]:
    """The integrity block of ``document`` (which must not hold one yet): hashes and, with ``key``, a signature."""
    integrity: dict[str, Any] = {
        "version": INTEGRITY_VERSION,
        "algorithm": SEAL_ALGORITHM,
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
        }
        signature = keys.sign(key, statement(document["report_format"], integrity))
        integrity["signature"]["value"] = base64.b64encode(signature).decode()
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


def _check_block(integrity: dict[str, Any]) -> str | None:
    """Why the integrity block is not one :func:`seal` wrote (its labels and fields), or ``None``."""
    version = integrity.get("version", 1)
    if type(version) is not int or version not in _FIELDS:
        shown = json.dumps(version) if type(version) is int and abs(version) < 10**6 else "unknown"
        return f"the integrity format {shown} is not one this auditor reads (1 or {INTEGRITY_VERSION})"
    unexpected, missing = sorted(set(integrity) - _FIELDS[version]), sorted(_FIELDS[version] - set(integrity))
    if unexpected:
        return f"altered: the integrity block holds a field {unexpected[0][:40]!r} that auditor never writes"
    if missing:
        return f"altered: the integrity block has no {missing[0]!r}"
    if integrity["algorithm"] != SEAL_ALGORITHM:
        return f'altered: the integrity block\'s algorithm is not "{SEAL_ALGORITHM}"'
    return None


def _check_signature(
    document: dict[str, Any], integrity: dict[str, Any], public_key: keys.PublicKey | None
) -> VerifyResult:
    sig = integrity["signature"]
    if sig is None:
        if public_key is not None:
            return VerifyResult(False, "the report is not signed, but a public key was given to check its signature")
        return VerifyResult(True, "content intact (not signed)")
    if not isinstance(sig, dict) or set(sig) != _SIGNATURE_FIELDS or not all(isinstance(v, str) for v in sig.values()):
        return VerifyResult(False, "the signature block is malformed", signed=True)
    try:
        embedded = keys.load_public_key(sig["public_key"])
        value = base64.b64decode(sig["value"], validate=True)
    except (InputError, binascii.Error, ValueError):
        return VerifyResult(False, "the signature block is malformed", signed=True)
    fingerprint, algorithm = keys.fingerprint(embedded), keys.signature_algorithm(embedded)
    # Each label must be the one the key itself gives: in format 1 the signature does not cover them,
    # so this is what makes an edited label fail there; in format 2 they are signed as well.
    if sig["public_key_sha256"] != fingerprint:
        return VerifyResult(False, "the signer's fingerprint does not match the public key in the report", True)
    if sig["algorithm"] != algorithm:
        return VerifyResult(False, f"altered: the signature algorithm label is not the key's ({algorithm})", True)
    if sig["public_key"] != keys.public_pem(embedded):
        return VerifyResult(False, "altered: the public key is not written as auditor writes it", True)
    if public_key is not None and keys.fingerprint(public_key) != fingerprint:
        return VerifyResult(
            False,
            f"signed by key {fingerprint}, not by the given key {keys.fingerprint(public_key)}",
            True,
            fingerprint,
        )
    if not keys.verify(public_key or embedded, value, statement(str(document.get("report_format")), integrity)):
        return VerifyResult(False, "the signature does not verify", True, fingerprint)
    checked = "the given key" if public_key is not None else "the key in the report only (give --public-key)"
    old = "; integrity format 1" if "version" not in integrity else ""
    return VerifyResult(
        True, f"content intact, signature valid ({checked}; signer {fingerprint}, {algorithm}{old})", True, fingerprint
    )


def _verify(document: Any, public_key: keys.PublicKey | None, html_sha256: str | None) -> VerifyResult:
    if not isinstance(document, dict) or not isinstance(document.get(INTEGRITY), dict):
        return VerifyResult(False, "not a sealed auditor report: it has no integrity block")
    integrity = document[INTEGRITY]
    problem = _check_block(integrity)
    if problem is not None:
        return VerifyResult(False, problem)
    try:
        content, evidence = content_sha256(document), evidence_sha256(document)
    except (TypeError, ValueError, RecursionError):
        return VerifyResult(False, "the report holds values canonical JSON cannot hold")
    if integrity["content_sha256"] != content:
        return VerifyResult(False, "altered: the content does not match its recorded SHA-256")
    if integrity["evidence_sha256"] != evidence:
        return VerifyResult(False, "altered: the evidence does not match its recorded SHA-256")
    if html_sha256 is not None:
        recorded = integrity["html_sha256"]
        if recorded is None:
            return VerifyResult(False, "the report records no HTML rendering to check")
        if html_sha256 != recorded:
            return VerifyResult(False, "altered: the HTML does not match the SHA-256 the report records")
    return _check_signature(document, integrity, public_key)


def verify_document(
    document: Any, *, public_key: keys.PublicKey | None = None, html: bytes | None = None
) -> VerifyResult:
    """Recompute ``document``'s hashes and check its integrity block and signature (required when
    ``public_key`` is given) and, with ``html``, that the HTML rendering is the one sealed."""
    return _verify(document, public_key, None if html is None else hashlib.sha256(html).hexdigest())


# --------------------------------------------------------------------------- reading a report file


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    if repr(value) != text:  # auditor writes every float as Python's shortest repr: 0.5, 1e-12
        raise ValueError(f"the number {text[:40]} is not written as auditor writes numbers")
    return value


def _integer(text: str) -> int:
    if len(text) > 21:
        raise ValueError(f"the integer {text[:40]}... is larger than any auditor writes")
    value = int(text)
    if not _INT_RANGE[0] <= value < _INT_RANGE[1]:
        raise ValueError(f"the integer {text} is larger than any auditor writes")
    if str(value) != text:
        raise ValueError(f"the number {text} is not written as auditor writes numbers")
    return value


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


_CONTAINERS = (dict, list)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _depth(document: Any) -> int:
    """How deeply ``document`` nests (a scalar: 0), looking at each list's items in C, not in Python."""
    deepest, level = 0, [document] if isinstance(document, _CONTAINERS) else []
    while level:
        deepest += 1
        below: list[Any] = []
        for node in level:
            items = node.values() if isinstance(node, dict) else node
            below.extend(compress(items, map(isinstance, items, repeat(_CONTAINERS))))
        level = below
    return deepest


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return "null" if value is None else "a boolean" if isinstance(value, bool) else "a number"


def read_report(path: Path) -> dict[str, Any]:
    """A report's JSON object, read as hostile input (see the module's docstring for what is refused).

    Raises :class:`InputError` naming ``path`` for a file that is not a regular file of at most
    :data:`MAX_REPORT_BYTES`, not strict UTF-8 JSON as auditor writes it, not an object, or not a report
    (an owner bundle, say): "not readable as a report" (exit 4)."""
    from auditor.safeio import read_small_file

    path = Path(path)
    data = read_small_file(path, limit=MAX_REPORT_BYTES, what="a report")
    if data.count(b"[") + data.count(b"{") > MAX_CONTAINERS:
        raise InputError(path, f"not readable as a report: more than {MAX_CONTAINERS:,d} objects and lists")
    try:
        document = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=unique_keys,
            parse_constant=_refuse,
            parse_float=_number,
            parse_int=_integer,
        )
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text (bad byte at offset {exc.start}): damaged or altered") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON, damaged or altered: {exc.msg} (line {exc.lineno})") from None
    except DuplicateKeyError as exc:
        raise InputError(path, f"the key {exc.key[:60]!r} appears twice in one object: altered") from None
    except RecursionError:
        raise InputError(path, "not readable as a report: nested too deeply") from None
    except ValueError as exc:
        raise InputError(path, f"not valid JSON for auditor: {exc}") from None
    if not isinstance(document, dict):
        raise InputError(path, f"not readable as a report: the top level is {_kind(document)}, not an object")
    if document.get("format") == BUNDLE_FORMAT:
        raise InputError(path, "not readable as a report: it is an owner bundle")
    if not isinstance(document.get("report_format"), str):
        raise InputError(path, 'not readable as a report: it has no "report_format"')
    if _depth(document) > MAX_DEPTH:
        raise InputError(path, f"not readable as a report: nested more than {MAX_DEPTH} levels deep")
    if _SURROGATE_ESCAPE.search(data):  # "\\ud800" alone parses, but has no UTF-8 form to hash
        try:
            canonical_json(document)
        except ValueError:
            raise InputError(path, "not readable as a report: it holds text that is not Unicode") from None
    return document


def verify_report(path: Path, *, public_key: Path | None = None, html: Path | None = None) -> VerifyResult:
    """:func:`verify_document` on the report file ``path``; ``public_key`` is a PEM file, ``html`` the
    rendering to check (hashed as it is read). Raises :class:`InputError` for files that cannot be read
    or parsed, or that are not regular files of bounded size."""
    from auditor.safeio import sha256_file

    key = None
    if public_key is not None:
        try:
            key = keys.load_public_key(keys.read_key_file(public_key))
        except InputError as exc:
            raise InputError(public_key, exc.problem) from None
    document = read_report(path)
    digest = None
    if html is not None:
        try:
            digest = sha256_file(html, limit=MAX_HTML_BYTES, what="an HTML report")
        except OSError as exc:
            raise InputError(html, f"cannot read: {exc.strerror or exc}") from None
    return _verify(document, key, digest)
