"""The report as an in-toto attestation (a Statement in a DSSE envelope): what it binds, that generic
DSSE tooling verifies it, that ``report verify`` catches every alteration, and that it holds no secret."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import auditor
from auditor import keys
from auditor.bundle import load_bundle
from auditor.errors import EXIT_INPUT, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE
from auditor.report import attest

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _payload(path: Path) -> dict[str, Any]:
    env = json.loads(path.read_text())
    return json.loads(base64.b64decode(env["payload"]))


@pytest.fixture
def attested(
    tmp_path: Path, run_cli: Callable[..., Any], signer: Any, clean_model: Callable[..., Path]
) -> SimpleNamespace:
    """A suspect audited with a negative control, the report signed and attested with the signer's key."""
    suspect = shutil.copy(ASSETS / "st_cnn.safetensors", tmp_path / "suspect.safetensors")
    control = clean_model(tmp_path / "control.safetensors", seed=3)
    out = tmp_path / "out"
    passphrase = signer.private.parent.parent / "pass.txt"
    code, stdout, stderr = run_cli(
        "audit", suspect, "--control", control, "--out", out / "r.html", "--sign-key", signer.private,
        "--passphrase-file", passphrase, "--attest", "--case-id", "C-15",
    )  # fmt: skip
    assert code == 3, stderr  # no bundle: inconclusive
    assert f"attestation: {out / 'r.intoto.jsonl'}" in stdout
    return SimpleNamespace(suspect=Path(suspect), control=control, out=out, att=out / "r.intoto.jsonl",
                           json=out / "r.json", html=out / "r.html", public=signer.public)  # fmt: skip


def test_the_statement_binds_every_input_and_the_report(attested: SimpleNamespace) -> None:
    env = json.loads(attested.att.read_text())
    assert attested.att.read_text().count("\n") == 1  # JSON Lines: one envelope
    assert env["payloadType"] == "application/vnd.in-toto+json"
    stmt = _payload(attested.att)
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert stmt["predicateType"] == attest.PREDICATE_TYPE
    roles = {(s["annotations"]["role"], Path(s["name"]).name): s["digest"]["sha256"] for s in stmt["subject"]}
    assert roles == {
        ("suspect", "suspect.safetensors"): _sha(attested.suspect),
        ("control", "control.safetensors"): _sha(attested.control),
        ("report-html", "r.html"): _sha(attested.html),
        ("report-json", "r.json"): _sha(attested.json),
    }
    report = json.loads(attested.json.read_text())
    predicate = stmt["predicate"]
    assert predicate["verdict"] == report["verdict"] == "inconclusive"
    assert predicate["exit_code"] == report["exit_code"] == 3
    assert predicate["command"] == report["command"] and "--control" in predicate["command"]
    assert predicate["tool"] == report["tool"] and predicate["run"]["case_id"] == "C-15"
    assert predicate["report"]["content_sha256"] == report["integrity"]["content_sha256"]
    assert predicate["report"]["signer"]["public_key_sha256"] == report["integrity"]["signature"]["public_key_sha256"]
    assert predicate["controls"] == [{"name": "control.safetensors", "sha256": _sha(attested.control),
                                      "verdict": report["controls"]["models"][0]["verdict"]}]  # fmt: skip
    # The payload is the statement's RFC 8785 canonical JSON.
    import rfc8785

    assert base64.b64decode(env["payload"]) == rfc8785.dumps(stmt)


def test_generic_dsse_tooling_verifies_it(attested: SimpleNamespace) -> None:
    """What docs/report.md shows: securesystemslib alone, with the analyst's public key, checks the envelope."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    public = keys.load_public_key(attested.public.read_bytes())
    key = SSlibKey.from_crypto(public, keyid=keys.fingerprint(public), scheme="ed25519")
    env = Envelope.from_dict(json.loads(attested.att.read_text()))
    assert list(env.verify([key], 1)) == [keys.fingerprint(public)]
    from google.protobuf import json_format
    from in_toto_attestation.v1 import statement_pb2
    from in_toto_attestation.v1.statement import Statement

    Statement.copy_from_pb(json_format.ParseDict(json.loads(env.payload), statement_pb2.Statement())).validate()


def test_verify_passes_and_names_the_signer(attested: SimpleNamespace, run_cli: Callable[..., Any]) -> None:
    code, stdout, _ = run_cli("report", "verify", attested.att, "--public-key", attested.public,
                              "--subject", attested.suspect, "--subject", attested.control)  # fmt: skip
    assert code == EXIT_OK
    assert stdout.startswith(f"intact: {attested.att}: attestation valid (the given key; signer ")
    assert "4 subjects, 2 given file(s) among them; r.json matches and verifies" in stdout
    assert stdout.count("\n") == 1


def _resign(att: Path, stmt: dict[str, Any], key: keys.PrivateKey) -> None:
    att.write_bytes(attest.envelope_line(attest.envelope(stmt, key)))


@pytest.mark.parametrize(
    "alteration, message",
    [
        ("json", "altered: r.json does not match its subject's SHA-256"),
        ("html", "altered: r.html does not match its subject's SHA-256"),
        ("payload", "the envelope's signature does not verify"),
        ("other-key", "the envelope is not signed once by key"),
        ("same-key-new-verdict", "altered: the statement's predicate is not the one r.json gives"),
        ("same-key-new-subject", "altered: the statement's subject is not the one r.json gives"),
        ("unrelated-file", "unrelated.bin is not among the attested subjects"),
        ("wrong-public-key", "not by the given key"),
    ],
)
def test_verify_fails_on_every_alteration(
    attested: SimpleNamespace, run_cli: Callable[..., Any], signer: Any, tmp_path: Path, alteration: str, message: str
) -> None:
    args: list[Any] = []
    stmt = _payload(attested.att)
    passphrase = (signer.private.parent.parent / "pass.txt").read_text().strip().encode()
    own = keys.load_private_key(signer.private, passphrase)
    if alteration == "json":
        attested.json.write_text(json.dumps(json.loads(attested.json.read_text()), indent=1))
    elif alteration == "html":
        attested.html.write_bytes(attested.html.read_bytes().replace(b"</body>", b"<p>x</p></body>"))
    elif alteration == "payload":
        env = json.loads(attested.att.read_text())
        stmt["predicate"]["verdict"] = "detected"
        env["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
        attested.att.write_text(json.dumps(env))
    elif alteration == "other-key":
        other = keys.generate_keypair(tmp_path / "other", algorithm="ed25519")
        _resign(attested.att, stmt, keys.load_private_key(other.private))
    elif alteration == "same-key-new-verdict":
        stmt["predicate"]["verdict"] = "detected"
        _resign(attested.att, stmt, own)
    elif alteration == "same-key-new-subject":
        stmt["subject"][0]["digest"]["sha256"] = "0" * 64
        _resign(attested.att, stmt, own)
    elif alteration == "unrelated-file":
        (tmp_path / "unrelated.bin").write_bytes(b"not attested")
        args = ["--subject", tmp_path / "unrelated.bin"]
    else:
        other = keys.generate_keypair(tmp_path / "other", algorithm="ed25519")
        args = ["--public-key", other.public]
    code, stdout, _ = run_cli("report", "verify", attested.att, *args)
    assert code == EXIT_NOT_FOUND, stdout
    assert stdout.startswith(f"FAILED: {attested.att}: ") and message in stdout
    assert stdout.count("\n") == 1


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"\xff\xfe", "the attestation is not UTF-8 text"),
        (b"{}\n{}\n", "it holds 2 lines, not one envelope"),
        (b'{"payload": "", "payloadType": "text/plain", "signatures": []}', "the payload type is not"),
        (b'{"payload": "!!", "payloadType": "application/vnd.in-toto+json", "signatures": []}', "not base64"),
        (b'{"a": 1, "a": 2}', "appears twice"),
        (b"[1, 2]", "not a DSSE envelope"),
    ],
)
def test_an_unreadable_attestation_is_exit_4(
    tmp_path: Path, run_cli: Callable[..., Any], content: bytes, problem: str
) -> None:
    path = tmp_path / "r.intoto.jsonl"
    path.write_bytes(content)
    code, stdout, stderr = run_cli("report", "verify", path)
    assert code == EXIT_INPUT and stdout == ""
    assert stderr.startswith(f"error: {path}: ") and problem in stderr and stderr.count("\n") == 1


def test_a_missing_json_twin_is_exit_4(attested: SimpleNamespace, run_cli: Callable[..., Any]) -> None:
    attested.json.unlink()
    code, _, stderr = run_cli("report", "verify", attested.att)
    assert code == EXIT_INPUT and stderr == f"error: {attested.json}: no such file\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attest"], "--attest needs --sign-key"),
        (["--attest", "--sign-key", "KEY"], "--attest needs --out or --json-out"),
        (["--attest", "--sign-key", "KEY", "--json-out", "OUT", ASSETS / "pt_clean.pt"],
         "--attest needs --out: a batch's attestation goes beside its summary"),
    ],
)
def test_attest_usage_errors(
    tmp_path: Path, run_cli: Callable[..., Any], signer: Any, args: list[Any], message: str
) -> None:
    args = [signer.private if a == "KEY" else tmp_path / "out" if a == "OUT" else a for a in args]
    code, _, stderr = run_cli("audit", ASSETS / "st_cnn.safetensors", *args)
    assert code == EXIT_USAGE and message in stderr and stderr.count("\n") == 1


def test_the_attestation_shows_no_secret(
    hufunet_owner: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    bundle = hufunet_owner.out / "owner_bundle.json"
    key = keys.generate_keypair(tmp_path / "k", algorithm="rsa")
    out = tmp_path / "out"
    code, _, stderr = run_cli("audit", hufunet_owner.model_file, "--bundle", bundle, "--out", out / "r.html",
                              "--sign-key", key.private, "--attest")  # fmt: skip
    assert code == EXIT_OK, stderr
    text = (out / "r.intoto.jsonl").read_text() + json.dumps(_payload(out / "r.intoto.jsonl"))
    section = load_bundle(bundle).payload["hufunet"]
    for secret in (section["hmac_key"], section["eph"]["data"], section["sph"]["weight"], section["sph"]["bias"]):
        assert secret[:16] not in text and secret[-16:] not in text
    assert "PRIVATE KEY" not in text
    roles = {s["annotations"]["role"]: s for s in _payload(out / "r.intoto.jsonl")["subject"]}
    assert roles["owner-bundle"]["digest"]["sha256"] == _sha(bundle)
    code, stdout, _ = run_cli("report", "verify", out / "r.intoto.jsonl", "--public-key", key.public)
    assert code == EXIT_OK and "rsa-pkcs1v15-sha256" in stdout


#: Runs ``auditor ARGS`` in a fresh interpreter and writes its exit code and imported modules to a file.
RUN_ENTRY_POINT = """
import json, sys
result, args = sys.argv[1], sys.argv[2:]
sys.argv = ["auditor", *args]
from auditor.cli import main
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code
with open(result, "w") as fh:
    json.dump({"code": code, "modules": sorted(sys.modules)}, fh)
"""


def test_verifying_an_attestation_imports_no_torch(attested: SimpleNamespace, tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    env = {**os.environ, "AUDITOR_LOAD_PLUGINS": "",
           "PYTHONPATH": str(Path(auditor.__file__).resolve().parent.parent)}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", RUN_ENTRY_POINT, str(result), "report", "verify", str(attested.att)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    data = json.loads(result.read_text())
    assert data["code"] == 0 and proc.stdout.startswith("intact:"), proc.stdout + proc.stderr
    assert [m for m in ("torch", "numpy", "scipy", "onnx", "safetensors") if m in data["modules"]] == []
