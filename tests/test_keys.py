"""Owners' signing keys: generation, file modes, passphrases, signatures, and `auditor keys`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from auditor import keys
from auditor.errors import EXIT_INPUT, EXIT_USAGE, InputError, UsageError

MESSAGE = "© 2024 Example Owner. All rights reserved.".encode()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, keys.KeyPairPaths]:
    """One plain key pair per algorithm and one encrypted RSA pair, made once for the module."""
    root = tmp_path_factory.mktemp("keys")
    return {
        "rsa": keys.generate_keypair(root / "rsa"),
        "ed25519": keys.generate_keypair(root / "ed25519", algorithm="ed25519"),
        "encrypted": keys.generate_keypair(root / "enc", passphrase=b"correct horse"),
    }


def der_fingerprint(public_pem: bytes) -> str:
    key = serialization.load_pem_public_key(public_pem)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize(("algorithm", "name"), [("rsa", "rsa-pkcs1v15-sha256"), ("ed25519", "ed25519")])
def test_sign_verify_round_trip(pairs: dict[str, keys.KeyPairPaths], algorithm: str, name: str) -> None:
    private = keys.load_private_key(pairs[algorithm].private)
    public = keys.load_public_key(pairs[algorithm].public.read_bytes())
    assert keys.signature_algorithm(private) == keys.signature_algorithm(public) == name
    signature = keys.sign(private, MESSAGE)
    assert keys.verify(public, signature, MESSAGE)
    assert not keys.verify(public, signature, MESSAGE + b".")
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not keys.verify(public, flipped, MESSAGE)
    assert not keys.verify(public, signature[:-1], MESSAGE)
    assert not keys.verify(public, b"", MESSAGE)
    assert keys.public_pem(private) == keys.public_pem(public) == pairs[algorithm].public.read_text()
    assert keys.public_pem(public).startswith("-----BEGIN PUBLIC KEY-----\n")
    assert keys.load_public_key(keys.public_pem(private)) == public  # str accepted too


def test_signatures_are_deterministic(pairs: dict[str, keys.KeyPairPaths]) -> None:
    for algorithm in ("rsa", "ed25519"):
        private = keys.load_private_key(pairs[algorithm].private)
        assert keys.sign(private, MESSAGE) == keys.sign(private, MESSAGE)
    rsa_key = keys.load_private_key(pairs["rsa"].private)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert (rsa_key.key_size, rsa_key.public_key().public_numbers().e) == (3072, 65537)
    assert len(keys.sign(rsa_key, MESSAGE)) == 384


def test_a_signature_from_another_key_fails(pairs: dict[str, keys.KeyPairPaths]) -> None:
    signature = keys.sign(keys.load_private_key(pairs["rsa"].private), MESSAGE)
    other = keys.load_public_key(pairs["encrypted"].public.read_bytes())
    assert not keys.verify(other, signature, MESSAGE)
    ed_public = keys.load_public_key(pairs["ed25519"].public.read_bytes())
    assert not keys.verify(ed_public, signature, MESSAGE)


def test_file_modes(pairs: dict[str, keys.KeyPairPaths]) -> None:
    for pair in pairs.values():
        assert os.stat(pair.private).st_mode & 0o777 == 0o600
        assert os.stat(pair.private.parent).st_mode & 0o777 == 0o700
        assert pair.private.name == "owner_private.pem"
        assert pair.public.name == "owner_public.pem"
    assert b"-----BEGIN PRIVATE KEY-----" in pairs["rsa"].private.read_bytes()  # PKCS#8
    assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in pairs["encrypted"].private.read_bytes()


def test_private_key_is_created_0600_not_chmodded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def recording_open(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kw: object) -> int:
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode)

    def no_chmod(*args: object, **kwargs: object) -> None:
        raise AssertionError("the key file must get its mode at creation, not from chmod")

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    old_umask = os.umask(0)  # with no umask, only the creation mode can make it 0600
    try:
        pair = keys.generate_keypair(tmp_path / "k", algorithm="ed25519")
    finally:
        os.umask(old_umask)
    private_opens = [(flags, mode) for path, flags, mode in opened if path == str(pair.private)]
    assert len(private_opens) == 1
    flags, mode = private_opens[0]
    assert mode == 0o600
    assert flags & os.O_CREAT and flags & os.O_EXCL
    assert os.stat(pair.private).st_mode & 0o777 == 0o600


def test_passphrase_round_trip_and_messages(pairs: dict[str, keys.KeyPairPaths]) -> None:
    path = pairs["encrypted"].private
    key = keys.load_private_key(path, b"correct horse")
    assert keys.public_pem(key) == pairs["encrypted"].public.read_text()
    with pytest.raises(InputError) as missing:
        keys.load_private_key(path)
    assert str(missing.value) == f"{path}: the key is encrypted: give its passphrase"
    with pytest.raises(InputError) as wrong:
        keys.load_private_key(path, b"battery staple")
    assert str(wrong.value) == f"{path}: wrong passphrase or damaged key"
    plain = pairs["rsa"].private
    with pytest.raises(InputError) as needless:
        keys.load_private_key(plain, b"correct horse")
    assert str(needless.value) == f"{plain}: the key is not encrypted, but a passphrase was given"
    for message in (missing, wrong, needless):
        assert "correct horse" not in str(message.value) and "battery" not in str(message.value)


def test_damaged_encrypted_key(tmp_path: Path, pairs: dict[str, keys.KeyPairPaths]) -> None:
    lines = pairs["encrypted"].private.read_text().splitlines()
    lines[5] = lines[5][:10] + ("A" if lines[5][10] != "A" else "B") + lines[5][11:]
    path = tmp_path / "damaged.pem"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"wrong passphrase or damaged key$"):
        keys.load_private_key(path, b"correct horse")


def test_overwrite_refused(pairs: dict[str, keys.KeyPairPaths]) -> None:
    before = pairs["rsa"].private.read_bytes()
    with pytest.raises(UsageError) as exc:
        keys.generate_keypair(pairs["rsa"].private.parent)
    assert str(exc.value) == f"{pairs['rsa'].private}: already exists: auditor never overwrites a key file"
    assert pairs["rsa"].private.read_bytes() == before


def test_public_file_in_the_way_leaves_no_half_pair(tmp_path: Path) -> None:
    (tmp_path / "owner_public.pem").write_text("someone else's\n")
    with pytest.raises(UsageError, match=r"owner_public\.pem: already exists"):
        keys.generate_keypair(tmp_path, algorithm="ed25519")
    assert not (tmp_path / "owner_private.pem").exists()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as exc:
        keys.generate_keypair(tmp_path, algorithm="dsa")
    assert str(exc.value) == "unknown key algorithm 'dsa': choose one of rsa, ed25519"
    with pytest.raises(UsageError, match="the passphrase is empty"):
        keys.generate_keypair(tmp_path, passphrase=b"")
    assert list(tmp_path.iterdir()) == []


def write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, fmt: str = "pkcs8") -> Path:
    private_format = (
        serialization.PrivateFormat.PKCS8 if fmt == "pkcs8" else serialization.PrivateFormat.TraditionalOpenSSL
    )
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, private_format, serialization.NoEncryption()))
    return path


def test_unsupported_keys(tmp_path: Path) -> None:
    supported = "auditor supports RSA (2048 bits or more) and Ed25519 keys"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_path = write_key(tmp_path / "ec.pem", ec_key)
    with pytest.raises(InputError) as exc:
        keys.load_private_key(ec_path)
    assert str(exc.value) == f"{ec_path}: unsupported key type EC: {supported}"
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    small_path = write_key(tmp_path / "small.pem", small, "traditional")
    with pytest.raises(InputError) as exc:
        keys.load_private_key(small_path)
    assert str(exc.value) == f"{small_path}: an RSA key of 1024 bits is too small: {supported}"
    ec_public = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(InputError) as exc:
        keys.load_public_key(ec_public)
    assert str(exc.value) == f"unsupported public key type EC: {supported}"
    small_public = small.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(InputError) as exc:
        keys.load_public_key(small_public)
    assert str(exc.value) == f"an RSA key of 1024 bits is too small: {supported}"


def test_bad_key_files(tmp_path: Path, pairs: dict[str, keys.KeyPairPaths]) -> None:
    cases = {
        "missing.pem": (None, "no such file"),
        "empty.pem": (b"", "the file is empty"),
        "text.pem": (b"hello\n", "not a PEM private key"),
        "binary.pem": (bytes(range(256)), "not a PEM private key"),
        "public.pem": (pairs["rsa"].public.read_bytes(), "holds a public key, not a private key"),
        "garbled.pem": (
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "damaged or unreadable private key",
        ),
        "big.pem": (b"-" * (keys.MAX_KEY_BYTES + 1), "the file is too large for a key file (the limit is 1 MiB)"),
    }
    for name, (content, problem) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(InputError) as exc:
            keys.load_private_key(path)
        assert str(exc.value) == f"{path}: {problem}", name
    with pytest.raises(InputError) as exc:
        keys.load_private_key(tmp_path)
    assert str(exc.value) == f"{tmp_path}: is a folder, not a key file"


def test_bad_public_keys(pairs: dict[str, keys.KeyPairPaths]) -> None:
    cases: list[tuple[bytes | str, str]] = [
        (b"", "not a PEM public key"),
        ("plain text", "not a PEM public key"),
        (
            "-----BEGIN PUBLIC KEY-----\nü\n-----END PUBLIC KEY-----\n",
            "not a PEM public key (it holds non-ASCII characters)",
        ),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "damaged or unreadable PEM public key"),
        (pairs["ed25519"].private.read_bytes(), "holds a private key where a public key belongs"),
    ]
    for pem, problem in cases:
        with pytest.raises(InputError) as exc:
            keys.load_public_key(pem)
        assert str(exc.value) == problem
        assert "PRIVATE" not in str(exc.value)


def test_cli_keys_new(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    out = tmp_path / "owner"
    result = run_cli("keys", "new", "--out", str(out))
    assert result.code == 0, result.stderr
    fingerprint = der_fingerprint((out / "owner_public.pem").read_bytes())
    assert f"fingerprint: SHA256:{fingerprint}\n" in result.stdout
    assert str(out / "owner_private.pem") in result.stdout
    assert str(out / "owner_public.pem") in result.stdout
    assert "rsa-pkcs1v15-sha256 (RSA 3072 bits)" in result.stdout
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    assert os.stat(out / "owner_private.pem").st_mode & 0o777 == 0o600

    again = run_cli("keys", "new", "--out", str(out), "--ask-passphrase", input="unused\nunused\n")
    assert again.code == EXIT_USAGE  # a UsageError, refused before asking for a passphrase
    assert again.stderr == f"error: {out / 'owner_private.pem'}: already exists: auditor never overwrites a key file\n"
    assert "Passphrase" not in again.stdout + again.stderr


def test_cli_error_is_one_line_with_its_exit_code(
    tmp_path: Path, pairs: dict[str, keys.KeyPairPaths], run_cli: Callable[..., Any]
) -> None:
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("battery staple\n")
    path = pairs["encrypted"].private
    result = run_cli("keys", "show", str(path), "--passphrase-file", str(wrong))
    assert result.code == EXIT_INPUT
    assert result.stderr == f"error: {path}: wrong passphrase or damaged key\n"
    assert result.stdout == ""


def test_cli_new_with_asked_passphrase_and_show(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    out = tmp_path / "asked"
    result = run_cli(
        "keys", "new", "--out", str(out), "--algorithm", "ed25519", "--ask-passphrase", input="s3cret\ns3cret\n"
    )
    output = result.stdout + result.stderr
    assert result.code == 0, output
    assert "s3cret" not in output and "PRIVATE KEY" not in output
    assert "encrypted with your passphrase" in output
    key = keys.load_private_key(out / "owner_private.pem", b"s3cret")
    fingerprint = keys.fingerprint(key)
    assert f"fingerprint: SHA256:{fingerprint}" in output

    locked = run_cli("keys", "show", str(out / "owner_private.pem"))
    assert locked.code == 0
    assert "private key, encrypted" in locked.stdout + locked.stderr
    assert fingerprint not in locked.stdout + locked.stderr

    unlocked = run_cli("keys", "show", str(out / "owner_private.pem"), "--ask-passphrase", input="s3cret\n")
    assert unlocked.code == 0, unlocked.stdout + unlocked.stderr
    assert "ed25519 (Ed25519 256 bits)" in unlocked.stdout + unlocked.stderr
    assert f"fingerprint: SHA256:{fingerprint}" in unlocked.stdout + unlocked.stderr

    public = run_cli("keys", "show", str(out / "owner_public.pem"), "--json")
    assert public.code == 0
    assert f'"fingerprint_sha256": "{fingerprint}"' in public.stdout + public.stderr
    assert '"kind": "public key"' in public.stdout + public.stderr


def test_cli_passphrase_file_first_line(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    secret = tmp_path / "pass.txt"
    secret.write_bytes(b"first line\r\nsecond line\n")
    out = tmp_path / "k"
    result = run_cli("keys", "new", "--out", str(out), "--algorithm", "ed25519", "--passphrase-file", str(secret))
    assert result.code == 0, result.stdout + result.stderr
    keys.load_private_key(out / "owner_private.pem", b"first line")


def test_cli_errors_are_usage_errors(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    both = run_cli("keys", "new", "--out", str(tmp_path / "k"), "--passphrase-file", str(pw), "--ask-passphrase")
    assert both.code == EXIT_USAGE  # a UsageError
    assert both.stderr == "error: give --passphrase-file or --ask-passphrase, not both\n"
    bad = run_cli("keys", "new", "--out", str(tmp_path / "k"), "--algorithm", "dsa")
    assert bad.code == EXIT_USAGE and bad.stderr.startswith("error: ")  # a UsageError, not a click usage message
    empty = tmp_path / "empty"
    empty.write_text("\n")
    blank = run_cli("keys", "new", "--out", str(tmp_path / "k"), "--passphrase-file", str(empty))
    assert blank.code == EXIT_INPUT  # an InputError
    assert blank.stderr == f"error: {empty}: the first line is empty: it should hold the passphrase\n"
    assert not (tmp_path / "k").exists()
