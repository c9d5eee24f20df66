"""Careful file I/O for the core and the plugins: hostile small files read with a bound, files hashed
in chunks, and files written whole or not at all.

Only the standard library: the CLI's quick commands import this without torch.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from auditor.errors import InputError

__all__ = ["CHUNK", "read_small_file", "sha256_file", "write_atomically"]

#: Bytes read at a time when hashing.
CHUNK = 1 << 20


def _limit_text(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 and limit % (1 << 20) == 0 else f"{limit:,d} bytes"


def read_small_file(path: Path, *, limit: int, what: str) -> bytes:
    """The whole of ``path``, at most ``limit`` bytes, never more read.

    Refuses, with an :class:`~auditor.errors.InputError` naming the file, a
    missing file, a folder ("is a folder, not {what}"), anything but a regular
    file, and a file over the limit ("the file is too large for {what}"),
    checked before and after reading since the file may grow in between.
    """
    path = Path(path)
    too_large = f"the file is too large for {what} (the limit is {_limit_text(limit)})"
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(path, f"is a folder, not {what}")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(path, "not a regular file")
    if info.st_size > limit:
        raise InputError(path, too_large)
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InputError(path, too_large)
    return data


def sha256_file(path: str | os.PathLike[str], *, progress: Callable[[int], None] | None = None) -> str:
    """Hex SHA-256 of a file's bytes, reading 1 MiB at a time.

    ``progress``, if given, is called with the number of bytes of each chunk read.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def _create(path: Path, mode: int) -> int:
    # O_EXCL: a fresh file, never one planted there (nor through a symlink); ``mode`` (less the umask)
    # is set at creation, so a secret is never readable by others, not even briefly.
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    path: Path, data: bytes | Callable[[Path], None], *, mode: int = 0o666, exclusive: bool = False
) -> None:
    """Write ``path`` whole or not at all: readers see the old file or the new one, never half of it.

    ``data`` is the file's bytes, or a function that writes the file at the path it is given (for a
    library that only writes to a path: ``safetensors``, ``torch.save``, the ONNX exporter). The bytes
    go to a temporary file beside ``path``, created with ``mode`` (less the umask) and kept at that
    mode, synced, then renamed over ``path`` in one step. With ``exclusive`` an existing ``path`` is
    never replaced (:class:`FileExistsError`): the file is created in place, and removed again if
    writing it fails.

    Errors are the operating system's (:class:`OSError`), or whatever ``data`` raised: the callers say
    what could not be written. Nothing is left behind when writing fails.
    """
    path = Path(path)
    target = path if exclusive else path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = _create(target, mode)
    try:
        if callable(data):
            os.close(fd)
            kept = target.stat().st_mode & 0o777
            data(target)
            os.chmod(target, kept)  # a library may write a fresh file of its own (safetensors: 0600)
            _sync(target)
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if not exclusive:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
