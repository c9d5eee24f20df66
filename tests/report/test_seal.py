"""The report's seal: any one-character edit of its content is caught; signatures bind it, and every label
of the seal, to a key; a file that is not a report, or not a regular file, is an input error."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from auditor import keys
from auditor.bundle import canonical_json
from auditor.errors import EXIT_INPUT, EXIT_NOT_FOUND, EXIT_OK, InputError
from auditor.report.seal import INTEGRITY_VERSION, read_report, seal, verify_document, verify_report


def edits(text: str) -> list[tuple[str, str]]:
    """(what, edited text) for one-character edits at places that matter: the first letter or digit from
    the middle of each needle on is changed (never punctuation, which would only test the JSON parser)."""
    data = json.loads(text)
    f = data["findings"][0]
    targets = {
        "a hex digit of the suspect's hash": data["suspect"]["sha256"],
        "a digit of a metric": f'"best_k": {f["metrics"]["best_k"]}',
        "a letter of the summary": f["summary"][:40],
        "the date": data["run"]["date"],
        "the recorded content hash": data["integrity"]["content_sha256"],
        "the verdict": f'"verdict": "{data["verdict"]}"',
    }
    out = []
    for what, needle in targets.items():
        at = text.index(needle) + len(needle) // 2
        while not text[at].isalnum():
            at += 1
        out.append((what, text[:at] + ("1" if text[at] == "0" else "0") + text[at + 1 :]))
    return out


@pytest.fixture
def signed(signer: keys.KeyPairPaths, gr_reports: dict[str, Any]) -> dict[str, Any]:
    document = json.loads(gr_reports["json"].read_text())
    document.pop("integrity")
    key = keys.load_private_key(signer.private, b"correct horse battery staple")
    return {**document, "integrity": seal(document, key=key)}


def test_untouched_reports_verify(
    gr_reports: dict[str, Any], signed: dict[str, Any], signer: keys.KeyPairPaths
) -> None:
    result = verify_report(gr_reports["json"], html=gr_reports["html"])
    assert result.intact and not result.signed and result.message == "content intact (not signed)"
    public = keys.load_public_key(signer.public.read_bytes())
    assert verify_document(signed, public_key=public).intact
    assert verify_document(json.loads(json.dumps(signed, indent=7)), public_key=public).intact  # layout is free


def test_every_one_character_edit_is_caught(gr_reports: dict[str, Any], tmp_path: Path) -> None:
    text = gr_reports["json"].read_text()
    for what, edited in edits(text):
        assert edited != text, what
        path = tmp_path / "edited.json"
        path.write_text(edited)
        result = verify_report(path)
        assert not result.intact, what
        assert result.message.startswith("altered"), (what, result.message)


def test_signed_edits_are_caught_and_resealing_without_the_key_fails(
    signed: dict[str, Any],
    signer: keys.KeyPairPaths,
) -> None:
    public = keys.load_public_key(signer.public.read_bytes())
    text = json.dumps(signed, indent=2)
    for what, edited in edits(text):
        assert not verify_document(json.loads(edited), public_key=public).intact, what
    # A forger who edits the content and recomputes the hashes has no valid signature for them.
    forged = json.loads(text)
    forged["verdict"] = "not-detected"
    forged["integrity"] |= {
        k: v for k, v in seal({k: v for k, v in forged.items() if k != "integrity"}).items() if k.endswith("sha256")
    }
    result = verify_document(forged, public_key=public)
    assert not result.intact and result.message == "the signature does not verify"
    # ... and a forger who signs with their own key is caught when the analyst's key is required.
    thief = keys.generate_keypair(Path(signer.private.parent.parent / "thief"), algorithm="ed25519")
    resigned = {k: v for k, v in forged.items() if k != "integrity"}
    resigned["integrity"] = seal(resigned, key=keys.load_private_key(thief.private))
    assert verify_document(resigned).intact  # intact as such: it says who signed it...
    assert "not by the given key" in verify_document(resigned, public_key=public).message  # ...and it is not us


def test_html_must_match(gr_reports: dict[str, Any], tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(gr_reports["html"].read_text().replace("Verdict: watermark found", "Verdict: watermark fund"))
    result = verify_report(gr_reports["json"], html=page)
    assert not result.intact and result.message == "altered: the HTML does not match the SHA-256 the report records"


def test_broken_json_is_an_input_error(gr_reports: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_bytes(gr_reports["json"].read_bytes()[:-40])
    with pytest.raises(InputError, match="not valid JSON, damaged or altered"):
        verify_report(path)
    path.write_text('{"a": 1, "a": 2}')
    with pytest.raises(InputError, match="appears twice"):
        verify_report(path)
    path.write_text('{"report_format": "x"}')
    assert verify_report(path).message == "not a sealed auditor report: it has no integrity block"


# --- hand-made reports: what the signature covers, and files that are not reports ----------------------


@pytest.fixture
def small() -> dict[str, Any]:
    """A tiny report signed with a fresh Ed25519 key (``document``, ``key``, ``public``), as :func:`seal`
    writes it today."""
    key = ed25519.Ed25519PrivateKey.generate()
    document = {
        "report_format": "auditor-evidence-report", "report_version": 1, "run": {"date": "2025-01-01T00:00:00Z"},
        "findings": [{"detector": "d", "verdict": "detected", "metrics": {"p": 1e-12, "k": 250}}],
        "verdict": "detected", "exit_code": 0,
    }  # fmt: skip
    return {"document": {**document, "integrity": seal(document, key=key)}, "key": key, "public": key.public_key()}


def test_the_signature_covers_every_label_verify_prints_or_uses(small: dict[str, Any]) -> None:
    document, public = small["document"], small["public"]
    result = verify_document(document, public_key=public)
    assert result.intact and result.message.endswith(f"signer {keys.fingerprint(public)}, ed25519)")
    assert document["integrity"]["version"] == INTEGRITY_VERSION
    other_pem = keys.public_pem(ed25519.Ed25519PrivateKey.generate())
    edits: dict[str, Callable[[dict[str, Any]], None]] = {
        # issue 14 item 6: this label was not covered, and the edited report still verified as intact
        "the signature algorithm": lambda i: i["signature"].update(algorithm="rsa-pkcs1v15-sha256"),
        "the public key's text": lambda i: i["signature"].update(public_key=i["signature"]["public_key"] + "\n"),
        "the public key": lambda i: i["signature"].update(public_key=other_pem),
        "the fingerprint": lambda i: i["signature"].update(public_key_sha256="0" * 64),
        "the seal algorithm": lambda i: i.update(algorithm="sha512-canonical-json"),
        "the format version": lambda i: i.pop("version"),  # a downgrade to format 1 does not verify either
        "a new field": lambda i: i.update(note="checked by the court"),
        "a new signature field": lambda i: i["signature"].update(note="x"),
    }
    for what, edit in edits.items():
        edited = copy.deepcopy(document)
        edit(edited["integrity"])
        for key in (public, None):
            assert not verify_document(edited, public_key=key).intact, (what, key)


def _format_1(small: dict[str, Any]) -> dict[str, Any]:
    """``small`` sealed as auditor did before integrity format 2: its signature covers the hashes only."""
    document = copy.deepcopy(small["document"])
    integrity = document["integrity"]
    integrity.pop("version")
    signed = {k: integrity[k] for k in ("content_sha256", "evidence_sha256", "html_sha256")}
    message = canonical_json({**signed, "report_format": document["report_format"]})
    integrity["signature"]["value"] = base64.b64encode(small["key"].sign(message)).decode()
    return document


def test_format_1_reports_still_verify_and_their_labels_are_checked_against_the_key(small: dict[str, Any]) -> None:
    old = _format_1(small)
    result = verify_document(old, public_key=small["public"])
    assert result.intact and result.message.endswith("ed25519; integrity format 1)")
    for field, value in (("algorithm", "rsa-pkcs1v15-sha256"), ("public_key_sha256", "0" * 64)):
        edited = copy.deepcopy(old)
        edited["integrity"]["signature"][field] = value
        assert not verify_document(edited).intact, field
    edited = copy.deepcopy(old)
    edited["integrity"]["signature"]["algorithm"] = "rsa-pkcs1v15-sha256"
    assert verify_document(edited).message == "altered: the signature algorithm label is not the key's (ed25519)"


def test_a_tampered_label_fails_on_the_command_line(
    small: dict[str, Any], tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(small["document"], indent=2))
    assert run_cli("report", "verify", path).code == EXIT_OK
    edited = copy.deepcopy(small["document"])
    edited["integrity"]["signature"]["algorithm"] = "rsa-pkcs1v15-sha256"
    path.write_text(json.dumps(edited, indent=2))
    code, stdout, _ = run_cli("report", "verify", path)
    message = "altered: the signature algorithm label is not the key's (ed25519)"
    assert (code, stdout) == (EXIT_NOT_FOUND, f"FAILED: {path}: {message}\n")


NOT_REPORTS = {
    # issue 14 item 7: 1e999 parsed as infinity and the file was called "altered" (exit 1)
    "an infinite number": (b"1e999", "not valid JSON for auditor: the number 1e999 is out of range"),
    "an infinite value inside": (b'{"report_format": "r", "x": -1e999}', "the number -1e999 is out of range"),
    "NaN": (b'{"report_format": "r", "x": NaN}', "not valid JSON for auditor: NaN is not allowed in JSON"),
    "Infinity": (b'{"report_format": "r", "x": Infinity}', "Infinity is not allowed in JSON"),
    "a huge integer": (b'{"report_format": "r", "x": 123456789012345678901}', "larger than any auditor writes"),
    "a 5,000-digit integer": (b'{"x": ' + b"9" * 5000 + b"}", "larger than any auditor writes"),
    "a number auditor never writes": (b'{"report_format": "r", "x": 1e-999}', "not written as auditor writes"),
    "a list": (b"[1, 2]", "not readable as a report: the top level is a list, not an object"),
    "a string": (b'"report"', "not readable as a report: the top level is a string, not an object"),
    "an owner bundle": (
        b'{"format": "auditor-owner-bundle", "version": 1, "payload": {}}',
        "not readable as a report: it is an owner bundle",
    ),
    "an object without report_format": (b'{"integrity": {}}', 'not readable as a report: it has no "report_format"'),
    "a repeated key": (b'{"report_format": "r", "a": 1, "a": 2}', "the key 'a' appears twice in one object: altered"),
    "65 levels": (b'{"report_format": "r", "x": ' + b"[" * 64 + b"]" * 64 + b"}", "nested more than 64 levels deep"),
    "100,000 levels": (b"[" * 100_000 + b"]" * 100_000, "not readable as a report: nested too deeply"),
    "too many lists": (b"[" + b"[]," * 1_000_000 + b"[]]", "more than 1,000,000 objects and lists"),
    "Latin-1 text": (b'{"report_format": "caf\xe9"}', "not UTF-8 text (bad byte at offset 22): damaged or altered"),
    "a lone surrogate": (b'{"report_format": "r", "x": "\\ud800"}', "it holds text that is not Unicode"),
    "a byte-order mark": (b'\xef\xbb\xbf{"report_format": "r"}', "not valid JSON, damaged or altered"),
    "nothing": (b"", "not valid JSON, damaged or altered"),
}


@pytest.mark.parametrize("content", NOT_REPORTS.values(), ids=NOT_REPORTS.keys())
def test_files_that_are_not_reports_are_input_errors(
    content: tuple[bytes, str], tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    data, message = content
    path = tmp_path / "report.json"
    path.write_bytes(data)
    with pytest.raises(InputError) as info:
        verify_report(path)
    assert message in info.value.problem
    code, stdout, stderr = run_cli("report", "verify", path)
    assert (code, stdout) == (EXIT_INPUT, "")
    assert stderr.startswith(f"error: {path}: ") and stderr.count("\n") == 1


def test_a_real_nesting_of_64_levels_and_a_64_bit_integer_are_read(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_bytes(b'{"report_format": "r", "x": ' + b"[" * 63 + b"18446744073709551615" + b"]" * 63 + b"}")
    assert read_report(path)["report_format"] == "r"


def test_the_html_page_is_hashed_only_when_it_is_a_regular_file(
    small: dict[str, Any], special_files: SimpleNamespace, tmp_path: Path
) -> None:
    document = {k: v for k, v in small["document"].items() if k != "integrity"}
    page = tmp_path / "report.html"
    page.write_bytes(b"<html>page</html>")
    report = tmp_path / "report.json"
    report.write_text(json.dumps({**document, "integrity": seal(document, html=page.read_bytes())}))
    assert verify_report(report, html=page).intact
    for path, problem in (
        (special_files.fifo, "is a named pipe (FIFO), not a regular file: auditor reads only regular files"),
        (special_files.device, "is a character device, not a regular file: auditor reads only regular files"),
        (special_files.folder, "is a folder, not an HTML report"),
    ):
        with pytest.raises(InputError) as info:
            verify_report(report, html=path)
        assert (info.value.path, info.value.problem) == (str(path), problem)
