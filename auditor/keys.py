"""Owners' signing keys: make, load, sign and verify (the spec's signature alpha).

An owner signs the copyright statement with a private key; the signature, the
statement and the public key travel in the owner bundle, so a watermark that is
derived from the signature is bound to an identity. RSA-3072 with PKCS#1 v1.5 and
SHA-256 is the default because it is deterministic: the same key and statement
always give the same signature, hence the same signature bits. Ed25519 is
deterministic too and is offered as the small, fast choice.

Key files are PEM. The private key is PKCS#8, encrypted when a passphrase is
given, and created readable by its owner only (mode 0600) from the first byte.
Every problem with a key file is an :class:`~auditor.errors.InputError` naming
the file; no message ever holds key material or a passphrase.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from auditor.errors import InputError, UsageError
from auditor.safeio import read_small_file, write_atomically

__all__ = [
    "ALGORITHMS",
    "MIN_RSA_BITS",
    "PRIVATE_FILE",
    "PUBLIC_FILE",
    "KeyPairPaths",
    "PrivateKey",
    "PublicKey",
    "fingerprint",
    "generate_keypair",
    "key_description",
    "load_private_key",
    "load_public_key",
    "pem_kind",
    "public_pem",
    "read_key_file",
    "sign",
    "signature_algorithm",
    "verify",
]

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey

#: What ``generate_keypair(algorithm=...)`` accepts.
ALGORITHMS = ("rsa", "ed25519")
RSA_BITS = 3072
MIN_RSA_BITS = 2048
PRIVATE_FILE = "owner_private.pem"
PUBLIC_FILE = "owner_public.pem"
#: A PEM key is a few kilobytes; anything far larger is not one, so it is never read whole.
MAX_KEY_BYTES = 1 << 20
SUPPORTED = f"auditor supports RSA ({MIN_RSA_BITS} bits or more) and Ed25519 keys"


@dataclass(frozen=True)
class KeyPairPaths:
    """Where :func:`generate_keypair` wrote the two key files."""

    private: Path
    public: Path


def generate_keypair(out_dir: Path, *, algorithm: str = "rsa", passphrase: bytes | None = None) -> KeyPairPaths:
    """Make a new key pair and write ``owner_private.pem`` and ``owner_public.pem`` in ``out_dir``.

    ``algorithm`` is ``"rsa"`` (RSA-3072, e=65537) or ``"ed25519"``. With a
    ``passphrase`` the private key is encrypted (PKCS#8, best available
    encryption). ``out_dir`` is created (mode 0700) if missing; existing key files
    are never overwritten. Raises :class:`UsageError` for an unknown algorithm, an
    empty passphrase, a key file that already exists or a folder that cannot be
    written.
    """
    if algorithm not in ALGORITHMS:
        raise UsageError(f"unknown key algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    if passphrase is not None and not passphrase:
        raise UsageError("the passphrase is empty: give a non-empty passphrase or none")
    out_dir = Path(out_dir)
    paths = KeyPairPaths(private=out_dir / PRIVATE_FILE, public=out_dir / PUBLIC_FILE)
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{out_dir}: cannot create the key folder: {exc.strerror or exc}") from None
    if not out_dir.is_dir():
        raise UsageError(f"{out_dir}: not a folder")
    for path in (paths.private, paths.public):
        if os.path.lexists(path):
            raise UsageError(f"{path}: already exists: auditor never overwrites a key file")

    key: PrivateKey
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    private_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    _write_new(paths.private, private_bytes, 0o600)
    try:
        _write_new(paths.public, public_pem(key).encode("ascii"), 0o644)
    except UsageError:
        paths.private.unlink()  # half a key pair is worse than none
        raise
    return paths


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # Never replace a file (or follow a planted symlink); the mode is set at
    # creation, so a private key is never readable by others, not even briefly.
    try:
        write_atomically(path, data, mode=mode, exclusive=True)
    except FileExistsError:
        raise UsageError(f"{path}: already exists: auditor never overwrites a key file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot write: {exc.strerror or exc}") from None


def pem_kind(data: bytes) -> str:
    """What a PEM file holds, from its armour alone: ``"public"``, ``"private"``,
    ``"encrypted-private"`` or ``"unknown"`` (not PEM, or a kind auditor does not read)."""
    head = data[:4096]
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in head:
        return "encrypted-private"
    if b"PRIVATE KEY-----" in head:
        return "encrypted-private" if b"Proc-Type: 4,ENCRYPTED" in head else "private"
    if b"PUBLIC KEY-----" in head:
        return "public"
    return "unknown"


def read_key_file(path: Path) -> bytes:
    """The bytes of a key file, refusing a missing, empty or oversized one (:class:`InputError`)."""
    data = read_small_file(Path(path), limit=MAX_KEY_BYTES, what="a key file")
    if not data:
        raise InputError(path, "the file is empty")
    return data


def load_private_key(path: Path, passphrase: bytes | None = None) -> PrivateKey:
    """Read an owner's private key from a PEM file, decrypting it with ``passphrase``.

    Raises :class:`InputError` naming ``path`` when the file is missing, not a PEM
    private key, encrypted without a passphrase given, given a passphrase it does
    not need, undecryptable (wrong passphrase or damaged), or of an unsupported
    type or size.
    """
    data = read_key_file(path)
    kind = pem_kind(data)
    if kind == "public":
        raise InputError(path, "holds a public key, not a private key")
    if kind == "unknown":
        raise InputError(path, "not a PEM private key")
    if kind == "encrypted-private" and not passphrase:
        raise InputError(path, "the key is encrypted: give its passphrase")
    if kind == "private" and passphrase:
        raise InputError(path, "the key is not encrypted, but a passphrase was given")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except UnsupportedAlgorithm:
        raise InputError(path, f"unsupported key type: {SUPPORTED}") from None
    except (ValueError, TypeError):
        if kind == "encrypted-private":
            raise InputError(path, "wrong passphrase or damaged key") from None
        raise InputError(path, "damaged or unreadable private key") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, rsa.RSAPrivateKey):
        _check_rsa_size(path, key.key_size)
        return key
    raise InputError(path, f"unsupported key type {_type_name(key)}: {SUPPORTED}")


def load_public_key(pem: bytes | str) -> PublicKey:
    """Parse a PEM public key (SubjectPublicKeyInfo or PKCS#1 RSA).

    Raises :class:`InputError` (without a path: the caller knows where the PEM
    came from) when it is not a PEM public key or of an unsupported type or size.
    """
    if isinstance(pem, str):
        try:
            pem = pem.encode("ascii")
        except UnicodeEncodeError:
            raise InputError(None, "not a PEM public key (it holds non-ASCII characters)") from None
    if not isinstance(pem, bytes):
        raise InputError(None, f"not a PEM public key (a {type(pem).__name__}, not text)")
    if len(pem) > MAX_KEY_BYTES:
        raise InputError(None, "too large to be a PEM public key")
    kind = pem_kind(pem)
    if kind in ("private", "encrypted-private"):
        raise InputError(None, "holds a private key where a public key belongs")
    if kind != "public":
        raise InputError(None, "not a PEM public key")
    try:
        key = serialization.load_pem_public_key(pem)
    except UnsupportedAlgorithm:
        raise InputError(None, f"unsupported public key type: {SUPPORTED}") from None
    except (ValueError, TypeError):
        raise InputError(None, "damaged or unreadable PEM public key") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, rsa.RSAPublicKey):
        _check_rsa_size(None, key.key_size)
        return key
    raise InputError(None, f"unsupported public key type {_type_name(key)}: {SUPPORTED}")


def _check_rsa_size(path: Path | None, bits: int) -> None:
    if bits < MIN_RSA_BITS:
        raise InputError(path, f"an RSA key of {bits} bits is too small: {SUPPORTED}")


def _type_name(key: object) -> str:
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, x448, x25519

    kinds = {
        "EC": (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey),
        "DSA": (dsa.DSAPrivateKey, dsa.DSAPublicKey),
        "Ed448": (ed448.Ed448PrivateKey, ed448.Ed448PublicKey),
        "X25519": (x25519.X25519PrivateKey, x25519.X25519PublicKey),
        "X448": (x448.X448PrivateKey, x448.X448PublicKey),
    }
    return next((name for name, types in kinds.items() if isinstance(key, types)), type(key).__name__)


def _public(key: PrivateKey | PublicKey) -> PublicKey:
    if isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        return key.public_key()
    if isinstance(key, rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        return key
    raise UsageError(f"not a supported key object ({type(key).__name__}): {SUPPORTED}")


def public_pem(key: PrivateKey | PublicKey) -> str:
    """The public half of ``key`` as SubjectPublicKeyInfo PEM text."""
    return (
        _public(key)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def fingerprint(key: PrivateKey | PublicKey) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo of ``key``'s public half."""
    der = _public(key).public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def key_description(key: PrivateKey | PublicKey) -> str:
    """``"RSA 3072 bits"`` or ``"Ed25519 256 bits"``."""
    public = _public(key)
    if isinstance(public, rsa.RSAPublicKey):
        return f"RSA {public.key_size} bits"
    return "Ed25519 256 bits"


def signature_algorithm(key: PrivateKey | PublicKey) -> str:
    """The signature scheme ``key`` makes or checks: ``"rsa-pkcs1v15-sha256"`` or ``"ed25519"``."""
    return "rsa-pkcs1v15-sha256" if isinstance(_public(key), rsa.RSAPublicKey) else "ed25519"


def sign(private_key: PrivateKey, message: bytes) -> bytes:
    """Sign ``message``: RSA with PKCS#1 v1.5 and SHA-256, or plain Ed25519; both deterministic."""
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(message)
    raise UsageError(f"not a supported private key ({type(private_key).__name__}): {SUPPORTED}")


def verify(public_key: PublicKey, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s signature of ``message``; ``False``, never an
    exception, for a bad, truncated or malformed signature."""
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        else:
            raise UsageError(f"not a supported public key ({type(public_key).__name__}): {SUPPORTED}")
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
