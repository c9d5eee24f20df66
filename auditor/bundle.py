"""The owner bundle: the one versioned file an owner hands to the analyst.

This module is the envelope only; each watermarking scheme puts its own fields
in ``payload`` and documents them (each scheme's page under docs/).
The envelope records the SHA-256 of the canonical JSON of the payload, which
catches accidental damage and naive edits. It proves no identity: anyone can
recompute it. Identity comes from the scheme's signature, which the detector
verifies with the public key in the payload. See docs/owner_bundle.md.

A bundle handed to auditor is hostile until proven otherwise: its size is capped
before it is read, and every way it can be broken is one
:class:`~auditor.errors.InputError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditor.errors import InputError, UsageError
from auditor.jsondata import DuplicateKeyError, unique_keys
from auditor.safeio import read_small_file, write_atomically

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "MAX_BUNDLE_BYTES",
    "MAX_CONTAINERS",
    "OwnerBundle",
    "canonical_json",
    "load_bundle",
    "save_bundle",
]

BUNDLE_FORMAT = "auditor-owner-bundle"
BUNDLE_VERSION = 1
MAX_BUNDLE_BYTES = 64 << 20
#: Objects and lists in a bundle (payloads hold tens to thousands): an empty list costs Python 64 bytes
#: for 3 bytes of JSON, so this bounds what a hostile bundle makes the parser build.
MAX_CONTAINERS = 1_000_000
REQUIRED_FIELDS = ("format", "version", "scheme", "secret", "payload", "payload_sha256")
OPTIONAL_FIELDS = ("created_by",)


@dataclass(frozen=True)
class OwnerBundle:
    """A loaded owner bundle.

    ``sha256`` is the SHA-256 of the file's bytes (what a report cites), not the
    payload hash recorded inside it; ``path`` is ``None`` for a bundle not read
    from a file; ``secret`` says the payload holds a secret (an HMAC key) and the
    file should not be shared.
    """

    scheme: str
    version: int
    payload: dict[str, Any]
    sha256: str
    path: Path | None
    secret: bool


def canonical_json(data: Any) -> bytes:
    """The canonical UTF-8 JSON of ``data``: keys sorted, no spaces, non-ASCII kept as is.

    Raises ``ValueError`` for NaN or infinity (JSON has neither) and for text that
    is not valid Unicode (lone surrogates), ``TypeError`` for values JSON cannot hold.
    """
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def save_bundle(path: Path, *, scheme: str, payload: dict[str, Any], secret: bool = False) -> str:
    """Write an owner bundle to ``path`` atomically and return the SHA-256 of the file.

    A ``secret`` bundle is created with mode 0600; others get the usual mode for a
    new file. An existing file at ``path`` is replaced in one step (a reader sees
    the old file or the new one, never half of one). Raises :class:`UsageError`
    for an empty scheme name, a payload that is not a JSON object of finite
    numbers and string keys, a bundle over :data:`MAX_BUNDLE_BYTES`, or a folder
    that cannot be written.
    """
    from auditor import __version__

    path = Path(path)
    if not isinstance(scheme, str) or not scheme:
        raise UsageError(f"{path}: the bundle's scheme must be a non-empty string")
    if not isinstance(payload, dict):
        raise UsageError(f"{path}: the bundle's payload must be a dict, not {type(payload).__name__}")
    try:
        canonical = canonical_json(payload)
        # Whatever a reader will parse must hash the same: this refuses keys that
        # collide once made strings ({1: .., "1": ..}) and other lossy values.
        stable = canonical_json(json.loads(canonical)) == canonical
    except (ValueError, TypeError, RecursionError) as exc:
        raise UsageError(f"{path}: the payload cannot be stored as JSON: {exc}") from None
    if not stable:
        raise UsageError(f"{path}: the payload cannot be stored as JSON: it does not survive a round trip")
    document = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "scheme": scheme,
        "secret": bool(secret),
        "created_by": f"auditor {__version__}",
        "payload": payload,
        "payload_sha256": hashlib.sha256(canonical).hexdigest(),
    }
    data = (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    if len(data) > MAX_BUNDLE_BYTES:
        raise UsageError(f"{path}: the bundle would be {len(data):,d} bytes, over the {MAX_BUNDLE_BYTES:,d} limit")
    _write_atomically(path, data, 0o600 if secret else 0o666)
    return hashlib.sha256(data).hexdigest()


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode: a secret never sits in a world-readable file.
    try:
        write_atomically(path, data, mode=mode)
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the bundle: {exc.strerror or exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as infinity, which no bundle holds
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _read_bounded(path: Path) -> bytes:
    return read_small_file(path, limit=MAX_BUNDLE_BYTES, what="an owner bundle")


def load_bundle(path: Path) -> OwnerBundle:
    """Read and check an owner bundle; the file is never modified.

    Raises :class:`InputError` naming ``path`` for a missing, oversized, empty or
    truncated file, bad UTF-8 or JSON, duplicate keys, nesting too deep, anything
    that is not an owner bundle, a version newer than this auditor reads, a field
    of the wrong type, and a payload that does not match its recorded hash.
    """
    path = Path(path)
    data = _read_bounded(path)
    if not data.strip():
        raise InputError(path, "the file is empty")
    if data.count(b"[") + data.count(b"{") > MAX_CONTAINERS:  # an upper bound, counted before parsing
        raise InputError(path, f"not an owner bundle: more than {MAX_CONTAINERS:,d} objects and lists")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        document = json.loads(text, object_pairs_hook=unique_keys, parse_constant=_refuse_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise InputError(
            path, f"not valid JSON, damaged or truncated: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except DuplicateKeyError as exc:
        key = _short(exc.key)
        raise InputError(path, f"not valid JSON for auditor: the key {key} appears twice in one object") from None
    except RecursionError:
        raise InputError(path, "not an owner bundle: nested too deeply") from None
    except ValueError as exc:  # NaN/Infinity, integers too long to convert
        raise InputError(path, f"not valid JSON for auditor: {exc}") from None
    return _check_document(path, document, hashlib.sha256(data).hexdigest())


def _check_document(path: Path, document: Any, file_sha256: str) -> OwnerBundle:
    if not isinstance(document, dict):
        raise InputError(path, f"not an owner bundle: the top level is {_json_type(document)}, not an object")
    if document.get("format") != BUNDLE_FORMAT:
        raise InputError(path, f'not an owner bundle: its "format" is not "{BUNDLE_FORMAT}"')
    if "version" not in document:
        raise InputError(path, 'not an owner bundle: the field "version" is missing')
    version = document["version"]
    if type(version) is not int or version < 1:
        raise InputError(path, f'not an owner bundle: its "version" must be a positive integer, not {_show(version)}')
    if version > BUNDLE_VERSION:
        raise InputError(
            path,
            f"bundle version {version} was made by a newer auditor (this one reads version {BUNDLE_VERSION}):"
            " upgrade auditor",
        )
    for name in REQUIRED_FIELDS:
        if name not in document:
            raise InputError(path, f'not an owner bundle: the field "{name}" is missing')
    for name in document:
        if name not in REQUIRED_FIELDS and name not in OPTIONAL_FIELDS:
            raise InputError(path, f"not an owner bundle: unexpected field {_short(name)}")
    scheme, secret, payload, recorded = (document[k] for k in ("scheme", "secret", "payload", "payload_sha256"))
    if not isinstance(scheme, str) or not scheme:
        raise InputError(path, f'the field "scheme" must be a non-empty string, not {_show(scheme)}')
    if not isinstance(secret, bool):
        raise InputError(path, f'the field "secret" must be true or false, not {_show(secret)}')
    if not isinstance(payload, dict):
        raise InputError(path, f'the field "payload" must be an object, not {_json_type(payload)}')
    if not isinstance(recorded, str) or len(recorded) != 64 or recorded.strip("0123456789abcdef"):
        raise InputError(path, 'the field "payload_sha256" must be 64 lower-case hex digits')
    created_by = document.get("created_by", "")
    if not isinstance(created_by, str):
        raise InputError(path, f'the field "created_by" must be a string, not {_json_type(created_by)}')
    try:
        actual = hashlib.sha256(canonical_json(payload)).hexdigest()
    except RecursionError:
        raise InputError(path, "not an owner bundle: nested too deeply") from None
    except ValueError:  # a lone surrogate escape ("\ud800") has no UTF-8 form
        raise InputError(path, "the payload holds text that is not valid Unicode") from None
    if actual != recorded:
        raise InputError(path, "the bundle was altered: its payload does not match its recorded hash")
    return OwnerBundle(scheme=scheme, version=version, payload=payload, sha256=file_sha256, path=path, secret=secret)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None or (isinstance(value, int) and abs(value) < 10**12):
        return json.dumps(value)
    return _json_type(value)
