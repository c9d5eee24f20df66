"""The report as an in-toto attestation: a Statement in a DSSE envelope, signed with the analyst's key.

The ecosystem's form for "this process produced this result about these artifacts" (in-toto
attestations, which OpenSSF model signing uses for models too). :func:`statement` derives it from the
sealed JSON twin alone, so anyone can rebuild it from the report and compare:

* ``_type``: ``https://in-toto.io/Statement/v1``;
* ``subject``: one resource descriptor per file, ``{name, digest: {sha256}, annotations: {role}}``:
  every input file the report records (the suspect's files, owner bundles, the reference's files, the
  negative controls' files, calibration files) and the report itself (its HTML page and JSON twin, by
  file name: they lie beside the attestation);
* ``predicateType``: :data:`PREDICATE_TYPE`;
* ``predicate``: the tool and plugin versions, the reproducible command and the detector options in it,
  the run block, the report's hashes and signer, the verdict, exit code and each finding's verdict, the
  reference check and the controls' verdicts. Only fields of the report, which never holds secret
  bundle material (:mod:`auditor.report.guard`); never a key but the public one's fingerprint.

The payload is the statement's canonical JSON (RFC 8785, :mod:`rfc8785`); the envelope is
securesystemslib's DSSE :class:`~securesystemslib.dsse.Envelope` (payload type
``application/vnd.in-toto+json``), signed over its pre-authentication encoding (PAE) with the key the
report is signed with, the key id being the key's auditor fingerprint. It is written as one JSON line,
``REPORT.intoto.jsonl``, the file name in-toto tools expect.

:func:`verify_attestation` reads the envelope as hostile input, checks the signature (under the given
public key, or the one the JSON twin carries), the statement's form (``in_toto_attestation``'s
validator), the JSON twin and HTML page beside it against their subjects, the JSON twin's own seal,
and that the statement is exactly the one the JSON twin gives; files given with ``--subject`` must be
among the subjects.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditor import keys
from auditor.errors import InputError
from auditor.jsondata import DuplicateKeyError, unique_keys

__all__ = [
    "ATTESTATION_SUFFIX",
    "MAX_ATTESTATION_BYTES",
    "PAYLOAD_TYPE",
    "BATCH_PREDICATE_TYPE",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "AttestResult",
    "attestation_path",
    "batch_statement",
    "envelope",
    "is_attestation",
    "merkle_root",
    "statement",
    "subjects",
    "verify_attestation",
]

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
#: What the predicate is; a URN, since auditor has no web address to resolve it at.
PREDICATE_TYPE = "urn:auditor:predicate:evidence-report:v1"
#: A batch's attestation: its subjects are the summary, its HTML page and the input files but the
#: suspects; the predicate carries the Merkle root over every report's evidence SHA-256, so one signature
#: covers a batch of any size (the summary lists each report and its digest).
BATCH_PREDICATE_TYPE = "urn:auditor:predicate:batch-summary:v1"
ATTESTATION_SUFFIX = ".intoto.jsonl"
_SUFFIXES = (ATTESTATION_SUFFIX, ".intoto.json", ".dsse.json")
#: An attestation holds a few hundred subjects at most; a report is limited to 32 MiB, this to 8 MiB.
MAX_ATTESTATION_BYTES = 8 << 20
_SSLIB_SCHEME = {"ed25519": "ed25519", "rsa-pkcs1v15-sha256": "rsa-pkcs1v15-sha256"}


def attestation_path(json_path: Path) -> Path:
    """Where the attestation of the JSON twin ``json_path`` goes: ``REPORT.json`` -> ``REPORT.intoto.jsonl``."""
    name = json_path.name[: -len(".json")] if json_path.name.lower().endswith(".json") else json_path.name
    return json_path.with_name(name + ATTESTATION_SUFFIX)


def is_attestation(path: Path) -> bool:
    """Whether ``path`` is named as an attestation (``.intoto.jsonl``, ``.intoto.json``, ``.dsse.json``)."""
    return Path(path).name.lower().endswith(_SUFFIXES)


# --------------------------------------------------------------------------- the statement


def _subject(name: Any, sha256: Any, role: str) -> dict[str, Any] | None:
    if not isinstance(sha256, str) or len(sha256) != 64:
        return None
    return {"name": str(name), "digest": {"sha256": sha256}, "annotations": {"role": role}}


def _files(entry: Any, role: str) -> list[dict[str, Any] | None]:
    if not isinstance(entry, dict):
        return []
    files = entry.get("files")
    if isinstance(files, list) and files:
        return [_subject(f.get("path") or f.get("name"), f.get("sha256"), role) for f in files if isinstance(f, dict)]
    return [_subject(entry.get("path") or entry.get("name"), entry.get("sha256"), role)]


def subjects(
    report: dict[str, Any], *, json_name: str, json_sha256: str, html_name: str | None
) -> list[dict[str, Any]]:
    """The statement's subjects: every input file ``report`` records, then the HTML page (when the report
    seals one) and the JSON twin, each once per role, in a stable order."""
    found: list[dict[str, Any] | None] = [*_files(report.get("suspect"), "suspect")]
    found += [_subject(b.get("path") or b.get("name"), b.get("sha256"), "owner-bundle")
              for b in report.get("bundles") or [] if isinstance(b, dict)]  # fmt: skip
    found += _files(report.get("reference"), "reference")
    controls = report.get("controls")
    for model in controls.get("models", []) if isinstance(controls, dict) else []:
        found += _files(model, "control")
    for row in report.get("calibration") or []:
        cal = row.get("calibration") if isinstance(row, dict) else None
        if isinstance(cal, dict):
            role = "calibration-shipped" if cal.get("shipped") else "calibration"
            found.append(_subject(cal.get("path") or cal.get("file") or cal.get("name"), cal.get("sha256"), role))
    html_sha = (report.get("integrity") or {}).get("html_sha256")
    if html_name is not None:
        found.append(_subject(html_name, html_sha, "report-html"))
    found.append(_subject(json_name, json_sha256, "report-json"))
    unique: dict[tuple[str, str, str], dict[str, Any]] = {}
    for s in found:
        if s is not None:
            unique.setdefault((s["annotations"]["role"], s["name"], s["digest"]["sha256"]), s)
    return list(unique.values())


def _options(command: Any) -> list[str]:
    try:
        words = shlex.split(command) if isinstance(command, str) else []
    except ValueError:
        return []
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--option"]


def _predicate(report: dict[str, Any]) -> dict[str, Any]:
    findings = [
        {k: f.get(k) for k in ("detector", "scheme", "subject", "bundle", "verdict", "measured_on")}
        for f in report.get("findings") or [] if isinstance(f, dict)
    ]  # fmt: skip
    check = report.get("reference_check")
    controls = report.get("controls")
    models = controls.get("models", []) if isinstance(controls, dict) else []
    return {
        **_run_fields(report),
        "report": _sealed(report),
        "verdict": report.get("verdict"),
        "exit_code": report.get("exit_code"),
        "findings": findings,
        "reference_verified": check.get("verified") if isinstance(check, dict) else None,
        "controls": [{"name": m.get("name"), "sha256": m.get("sha256"), "verdict": m.get("verdict")}
                     for m in models if isinstance(m, dict)],
    }  # fmt: skip


def statement(report: dict[str, Any], *, json_name: str, json_sha256: str, html_name: str | None) -> dict[str, Any]:
    """The in-toto Statement (v1) of the sealed ``report`` whose JSON twin is the file ``json_name`` of
    SHA-256 ``json_sha256``, and whose HTML page (if any) is ``html_name``."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects(report, json_name=json_name, json_sha256=json_sha256, html_name=html_name),
        "predicateType": PREDICATE_TYPE,
        "predicate": _predicate(report),
    }


def _run_fields(document: dict[str, Any]) -> dict[str, Any]:
    """What run made a sealed report or batch summary: the tool, its command and options, the run."""
    return {
        "tool": document.get("tool"),
        "command": document.get("command"),
        "options": _options(document.get("command")),
        "run": document.get("run"),
    }


def _sealed(document: dict[str, Any]) -> dict[str, Any]:
    """A sealed report's or summary's format and version, its integrity hashes and its signer."""
    integrity = document.get("integrity") or {}
    signature = integrity.get("signature") or {}
    return {
        "format": document.get("report_format"), "version": document.get("report_version"),
        "content_sha256": integrity.get("content_sha256"), "evidence_sha256": integrity.get("evidence_sha256"),
        "html_sha256": integrity.get("html_sha256"),
        "signer": {"algorithm": signature.get("algorithm"), "public_key_sha256": signature.get("public_key_sha256")}
        if signature else None,
    }  # fmt: skip


def _batch_predicate(summary: dict[str, Any]) -> dict[str, Any]:
    control = summary.get("error_control") or {}
    rows = [r for r in summary.get("suspects") or [] if isinstance(r, dict)]
    return {
        **_run_fields(summary),
        "summary": _sealed(summary),
        "merkle": summary.get("merkle"),
        "suspects": len(rows),
        "counts": summary.get("counts"),
        "exit_code": summary.get("exit_code"),
        "holm_survivors": control.get("survive") if isinstance(control, dict) else None,
        "reference_verified": (summary.get("reference_check") or {}).get("verified")
        if isinstance(summary.get("reference_check"), dict) else None,
    }  # fmt: skip


def batch_statement(
    summary: dict[str, Any], *, json_name: str, json_sha256: str, html_name: str | None
) -> dict[str, Any]:
    """The in-toto Statement (v1) of a sealed batch ``summary`` (JSON twin ``json_name`` of SHA-256
    ``json_sha256``, HTML page ``html_name``): subjects the summary's files, the owner bundles and the
    reference; predicate :data:`BATCH_PREDICATE_TYPE` with the Merkle root over the reports."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects(summary, json_name=json_name, json_sha256=json_sha256, html_name=html_name),
        "predicateType": BATCH_PREDICATE_TYPE,
        "predicate": _batch_predicate(summary),
    }


def _sslib_key(public: keys.PublicKey) -> Any:
    from securesystemslib.signer import SSlibKey

    algorithm = keys.signature_algorithm(public)
    return SSlibKey.from_crypto(public, keyid=keys.fingerprint(public), scheme=_SSLIB_SCHEME[algorithm])


def envelope(stmt: dict[str, Any], key: keys.PrivateKey) -> dict[str, Any]:
    """``stmt`` as RFC 8785 canonical JSON in a DSSE envelope signed with ``key`` (key id: its fingerprint)."""
    import rfc8785
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import CryptoSigner

    env = Envelope(payload=rfc8785.dumps(stmt), payload_type=PAYLOAD_TYPE, signatures={})
    env.sign(CryptoSigner(key, _sslib_key(key.public_key())))
    return dict(env.to_dict())


def envelope_line(env: dict[str, Any]) -> bytes:
    """The bytes of the attestation file: the envelope as one JSON line (JSON Lines, as in-toto writes)."""
    return json.dumps(env, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


# --------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class AttestResult:
    """The outcome of :func:`verify_attestation`: ``intact`` and one line saying why."""

    intact: bool
    message: str


def _strict_json(data: bytes, path: Path, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=unique_keys, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise InputError(path, f"{what} is not UTF-8 text (bad byte at offset {exc.start})") from None
    except DuplicateKeyError as exc:
        raise InputError(path, f"{what}: the key {exc.key[:60]!r} appears twice in one object") from None
    except RecursionError:
        raise InputError(path, f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError too
        raise InputError(path, f"{what} is not valid JSON: {str(exc)[:120]}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def read_envelope(path: Path) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    """The envelope in the attestation file ``path``, its payload's bytes and the statement they hold.

    Raises :class:`InputError` ("not readable as an attestation", exit 4) for a file that is not a regular
    file of at most :data:`MAX_ATTESTATION_BYTES` holding one DSSE envelope of an in-toto statement."""
    from auditor.safeio import read_small_file

    data = read_small_file(path, limit=MAX_ATTESTATION_BYTES, what="an attestation")
    lines = [line for line in data.splitlines() if line.strip()]
    if len(lines) != 1:
        raise InputError(path, f"not readable as an attestation: it holds {len(lines)} lines, not one envelope")
    env = _strict_json(lines[0], path, "the attestation")
    if not isinstance(env, dict) or set(env) != {"payload", "payloadType", "signatures"}:
        raise InputError(path, "not readable as an attestation: not a DSSE envelope {payload, payloadType, signatures}")
    if env["payloadType"] != PAYLOAD_TYPE:
        raise InputError(path, f"not readable as an attestation: the payload type is not {PAYLOAD_TYPE}")
    sigs = env["signatures"]
    if not isinstance(sigs, list) or not all(isinstance(s, dict) for s in sigs) or not isinstance(env["payload"], str):
        raise InputError(path, "not readable as an attestation: malformed envelope")
    try:
        payload = base64.b64decode(env["payload"], validate=True)
    except (binascii.Error, ValueError):
        raise InputError(path, "not readable as an attestation: the payload is not base64") from None
    stmt = _strict_json(payload, path, "the attested statement")
    if not isinstance(stmt, dict):
        raise InputError(path, "not readable as an attestation: the statement is not a JSON object")
    return env, payload, stmt


def _statement_problem(stmt: dict[str, Any]) -> str | None:
    """Why ``stmt`` is not a valid in-toto Statement v1 (in_toto_attestation's own check), or ``None``."""
    from google.protobuf import json_format
    from in_toto_attestation.v1 import statement_pb2
    from in_toto_attestation.v1.statement import Statement

    try:
        pb = json_format.ParseDict(stmt, statement_pb2.Statement())
        Statement.copy_from_pb(pb).validate()
    except (json_format.ParseError, ValueError, TypeError) as exc:
        return str(exc)[:160]
    return None


def _signature_ok(env: dict[str, Any], public: keys.PublicKey) -> bool:
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import FormatError, VerificationError

    try:
        parsed = Envelope.from_dict(json.loads(json.dumps(env)))  # from_dict edits the dict it is given
        parsed.verify([_sslib_key(public)], 1)
    except (VerificationError, FormatError, ValueError, KeyError, TypeError, binascii.Error):
        return False
    return True


def _beside(path: Path, stmt: dict[str, Any], role: str) -> tuple[Path, str] | None:
    for s in stmt.get("subject") or []:
        if isinstance(s, dict) and (s.get("annotations") or {}).get("role") == role:
            name = s.get("name")
            digest = (s.get("digest") or {}).get("sha256")
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise InputError(path, f"not readable as an attestation: the {role} subject is not a file name")
            return path.with_name(name), str(digest)
    return None


def verify_attestation(path: Path, *, public_key: Path | None = None, given: tuple[Path, ...] = ()) -> AttestResult:
    """Check the attestation file ``path``: its DSSE signature (under ``public_key``, a PEM file, or the key
    the JSON twin carries), the statement's form, the JSON twin and HTML page beside it against their
    subjects, the JSON twin's seal, the statement against the one the JSON twin gives, and that each file in
    ``given`` is a subject. Raises :class:`InputError` for files that cannot be read (exit 4)."""
    from auditor.report.seal import MAX_HTML_BYTES, verify_report
    from auditor.safeio import sha256_file

    path = Path(path)
    key = None
    if public_key is not None:
        try:
            key = keys.load_public_key(keys.read_key_file(public_key))
        except InputError as exc:
            raise InputError(public_key, exc.problem) from None
    env, payload, stmt = read_envelope(path)
    problem = _statement_problem(stmt)
    if problem is not None:
        return AttestResult(False, f"not a valid in-toto Statement v1: {problem}")
    kind = stmt.get("predicateType")
    if kind not in (PREDICATE_TYPE, BATCH_PREDICATE_TYPE):
        return AttestResult(False, f"the predicate type is not {PREDICATE_TYPE}: not an auditor attestation")
    twin = _beside(path, stmt, "report-json")
    if twin is None:
        return AttestResult(False, "the statement names no JSON twin (report-json subject)")
    json_path, json_digest = twin
    actual = sha256_file(json_path, limit=32 << 20, what="a report")
    if actual != json_digest:
        return AttestResult(False, f"altered: {json_path.name} does not match its subject's SHA-256")
    html = _beside(path, stmt, "report-html")
    if html is not None and sha256_file(html[0], limit=MAX_HTML_BYTES, what="an HTML report") != html[1]:
        return AttestResult(False, f"altered: {html[0].name} does not match its subject's SHA-256")
    sealed = verify_report(json_path, public_key=public_key, html=html[0] if html else None)
    if not sealed.intact:
        return AttestResult(False, f"the JSON twin {json_path.name} does not verify: {sealed.message}")
    from auditor.report.seal import read_report

    report = read_report(json_path)
    signature = (report.get("integrity") or {}).get("signature")
    if key is None:
        if not isinstance(signature, dict):
            return AttestResult(
                False, "the report is not signed, so the attestation's key is unknown: give --public-key"
            )
        key = keys.load_public_key(signature["public_key"])
    fingerprint = keys.fingerprint(key)
    if [s.get("keyid") for s in env["signatures"]] != [fingerprint]:
        return AttestResult(False, f"the envelope is not signed once by key {fingerprint}")
    if not _signature_ok(env, key):
        return AttestResult(False, "the envelope's signature does not verify")
    build = batch_statement if kind == BATCH_PREDICATE_TYPE else statement
    expected = build(report, json_name=json_path.name, json_sha256=json_digest,
                     html_name=html[0].name if html else None)  # fmt: skip
    for field in ("_type", "subject", "predicateType", "predicate"):
        if stmt.get(field) != expected[field]:
            return AttestResult(False, f"altered: the statement's {field} is not the one {json_path.name} gives")
    import rfc8785

    if payload != rfc8785.dumps(expected) or set(stmt) != set(expected):
        return AttestResult(False, "altered: the statement is not written as auditor writes it")
    if kind == BATCH_PREDICATE_TYPE:
        problem = _batch_problem(json_path, report, public_key)
        if problem is not None:
            return AttestResult(False, problem)
    digests = {s["digest"]["sha256"] for s in expected["subject"]}
    for extra in given:
        if sha256_file(extra, limit=1 << 62, what="a subject") not in digests:
            return AttestResult(False, f"{extra.name} is not among the attested subjects")
    checked = "the given key" if public_key is not None else "the key in the report only (give --public-key)"
    also = f", {len(given)} given file(s) among them" if given else ""
    if kind == BATCH_PREDICATE_TYPE:
        also += f"; Merkle root over {expected['predicate']['merkle']['leaves']} reports matches each report"
    return AttestResult(
        True,
        f"attestation valid ({checked}; signer {fingerprint}, {keys.signature_algorithm(key)});"
        f" {len(expected['subject'])} subjects{also}; {json_path.name} matches and verifies",
    )


def _batch_problem(json_path: Path, summary: dict[str, Any], public_key: Path | None) -> str | None:
    """Why the reports beside a batch summary do not match its Merkle root, or ``None``: the root is
    recomputed from the rows, and each report the summary lists must be beside it, verify, and have the
    evidence SHA-256 its row gives."""
    from auditor.report.seal import read_report, verify_report

    rows = [r for r in summary.get("suspects") or [] if isinstance(r, dict)]
    leaves = [r["evidence_sha256"] for r in rows if isinstance(r.get("evidence_sha256"), str)]
    merkle = summary.get("merkle") or {}
    try:
        root = merkle_root(leaves)
    except ValueError:
        return "altered: a row's evidence SHA-256 is not hexadecimal"
    if merkle.get("root") != root or merkle.get("leaves") != len(leaves):
        return "altered: the Merkle root is not the one the summary's rows give"
    for row in rows:
        files = row.get("report")
        if not isinstance(files, dict):
            continue
        names = [files.get("json"), files.get("html")]
        if not all(isinstance(n, str) and Path(n).name == n and n not in ("", ".", "..") for n in names):
            return "not readable as an attestation: a row names a report that is not a file name"
        js, page = json_path.with_name(str(names[0])), json_path.with_name(str(names[1]))
        result = verify_report(js, public_key=public_key, html=page)
        if not result.intact:
            return f"the report {js.name} does not verify: {result.message}"
        if read_report(js).get("integrity", {}).get("evidence_sha256") != row.get("evidence_sha256"):
            return f"altered: {js.name} is not the report its summary row gives"
    return None


def attestation_digest(env: dict[str, Any]) -> str:
    """SHA-256 of the attestation's bytes as written (what a timestamp is over)."""
    return hashlib.sha256(envelope_line(env)).hexdigest()


# --------------------------------------------------------------------------- the Merkle root


def merkle_root(leaves: Sequence[str]) -> str:
    """RFC 6962's Merkle tree hash over ``leaves`` (hex SHA-256 digests, in order); SHA-256 of nothing for none."""
    nodes = [hashlib.sha256(b"\x00" + bytes.fromhex(leaf)).digest() for leaf in leaves]
    return _tree(nodes).hex() if nodes else hashlib.sha256(b"").hexdigest()


def _tree(nodes: list[bytes]) -> bytes:
    if len(nodes) == 1:
        return nodes[0]
    split = 1 << ((len(nodes) - 1).bit_length() - 1)  # the largest power of two below the count
    return hashlib.sha256(b"\x01" + _tree(nodes[:split]) + _tree(nodes[split:])).digest()
