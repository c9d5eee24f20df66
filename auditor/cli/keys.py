"""``auditor keys``: make and show owners' signing keys.

Nothing here ever prints a private key or a passphrase; what is shown of a key
is its algorithm, size and the SHA-256 fingerprint of its public half.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from auditor import keys
from auditor.cli.console import printable
from auditor.errors import InputError, UsageError
from auditor.safeio import read_small_file

__all__ = ["MAX_PASSPHRASE_BYTES", "describe_key_file", "keys_app", "new_keys", "read_passphrase_file"]

#: A passphrase file holds one line; anything far larger is not one, so it is never read whole.
MAX_PASSPHRASE_BYTES = 64 << 10
keys_app = typer.Typer(help="Make and manage owners' signing keys.", no_args_is_help=True)


@keys_app.callback()
def _keys() -> None:
    """Make and manage owners' signing keys."""


PassphraseFile = Annotated[
    Path | None,
    typer.Option(
        "--passphrase-file",
        help="Read the passphrase from the first line of this file.",
        dir_okay=False,
    ),
]
AskPassphrase = Annotated[bool, typer.Option("--ask-passphrase", help="Ask for the passphrase (hidden input).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def read_passphrase_file(path: Path) -> bytes:
    """The first line of ``path`` (without its line ending) as a passphrase.

    The file must be a regular file of at most :data:`MAX_PASSPHRASE_BYTES` (a pipe or a device is
    refused unopened: :func:`auditor.safeio.read_small_file`)."""
    data = read_small_file(path, limit=MAX_PASSPHRASE_BYTES, what="a passphrase file")
    passphrase = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not passphrase:
        raise InputError(path, "the first line is empty: it should hold the passphrase")
    return passphrase


def _passphrase(passphrase_file: Path | None, ask: bool, *, confirm: bool) -> bytes | None:
    if passphrase_file is not None and ask:
        raise UsageError("give --passphrase-file or --ask-passphrase, not both")
    if passphrase_file is not None:
        return read_passphrase_file(passphrase_file)
    if ask:
        text: str = typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
        if not text:
            raise UsageError("the passphrase is empty")
        return text.encode("utf-8")
    return None


def new_keys(*, out_dir: Path, algorithm: str, passphrase: bytes | None) -> dict[str, Any]:
    """Make a key pair in ``out_dir`` and describe it (paths, algorithm, fingerprint)."""
    paths = keys.generate_keypair(out_dir, algorithm=algorithm, passphrase=passphrase)
    public = keys.load_public_key(keys.read_key_file(paths.public))
    return {
        "private_key": str(paths.private),
        "public_key": str(paths.public),
        "encrypted": passphrase is not None,
        "algorithm": keys.signature_algorithm(public),
        "key": keys.key_description(public),
        "fingerprint_sha256": keys.fingerprint(public),
    }


def describe_key_file(*, path: Path, passphrase: bytes | None) -> dict[str, Any]:
    """Describe a PEM key file: kind, algorithm, size, fingerprint; an encrypted private
    key read without a passphrase is described as encrypted and nothing more."""
    data = keys.read_key_file(path)
    kind = keys.pem_kind(data)
    info: dict[str, Any] = {"path": str(path), "kind": None, "encrypted": kind == "encrypted-private"}
    key: keys.PrivateKey | keys.PublicKey
    if kind == "public":
        if passphrase is not None:
            raise UsageError(f"{path}: a public key needs no passphrase")
        try:
            key = keys.load_public_key(data)
        except InputError as exc:
            raise InputError(path, exc.problem) from None
        info["kind"] = "public key"
    elif kind == "encrypted-private" and passphrase is None:
        info["kind"] = "private key"
        return {**info, "algorithm": None, "key": None, "fingerprint_sha256": None}
    else:
        key = keys.load_private_key(path, passphrase)
        info["kind"] = "private key"
    return {
        **info,
        "algorithm": keys.signature_algorithm(key),
        "key": keys.key_description(key),
        "fingerprint_sha256": keys.fingerprint(key),
    }


@keys_app.command()
def new(
    out: Annotated[Path, typer.Option("--out", help="Folder for owner_private.pem and owner_public.pem.")],
    algorithm: Annotated[
        str, typer.Option("--algorithm", help="rsa (RSA-3072, PKCS#1 v1.5, SHA-256) or ed25519.")
    ] = "rsa",
    passphrase_file: PassphraseFile = None,
    ask_passphrase: AskPassphrase = False,
    as_json: AsJson = False,
) -> None:
    """Make a new owner key pair; the private key file is readable by you only (mode 0600)."""
    if algorithm not in keys.ALGORITHMS:
        raise UsageError(f"unknown key algorithm {algorithm!r}: choose one of {', '.join(keys.ALGORITHMS)}")
    for name in (keys.PRIVATE_FILE, keys.PUBLIC_FILE):
        if (out / name).exists():  # before asking for a passphrase that would be wasted
            raise UsageError(f"{out / name}: already exists: auditor never overwrites a key file")
    passphrase = _passphrase(passphrase_file, ask_passphrase, confirm=True)
    info = new_keys(out_dir=out, algorithm=algorithm, passphrase=passphrase)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    protection = "encrypted with your passphrase" if info["encrypted"] else "NOT encrypted"
    typer.echo(f"private key: {printable(info['private_key'])}  (keep it secret; mode 0600, {protection})")
    typer.echo(f"public key:  {printable(info['public_key'])}")
    typer.echo(f"algorithm:   {info['algorithm']} ({info['key']})")
    typer.echo(f"fingerprint: SHA256:{info['fingerprint_sha256']}")


@keys_app.command()
def show(
    key_file: Annotated[Path, typer.Argument(help="A public or private key PEM file.")],
    passphrase_file: PassphraseFile = None,
    ask_passphrase: AskPassphrase = False,
    as_json: AsJson = False,
) -> None:
    """Show a key file's kind, algorithm, size and public-key fingerprint (never the key)."""
    passphrase = _passphrase(passphrase_file, ask_passphrase, confirm=False)
    info = describe_key_file(path=key_file, passphrase=passphrase)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"file:        {printable(info['path'])}")
    if info["algorithm"] is None:
        typer.echo("kind:        private key, encrypted")
        typer.echo("give --ask-passphrase or --passphrase-file to see its algorithm and fingerprint", err=True)
        return
    encrypted = ", encrypted" if info["encrypted"] else ""
    typer.echo(f"kind:        {info['kind']}{encrypted}")
    typer.echo(f"algorithm:   {info['algorithm']} ({info['key']})")
    typer.echo(f"fingerprint: SHA256:{info['fingerprint_sha256']}")
