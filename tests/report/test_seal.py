"""The report's seal: any one-character edit of its content is caught; signatures bind it to a key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from auditor import keys
from auditor.errors import InputError
from auditor.report.seal import seal, verify_document, verify_report


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
