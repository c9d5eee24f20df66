"""Careful file I/O for the core and the plugins: hostile files opened only when they are regular files,
small files read with a bound, files hashed in chunks, and files written whole or not at all.

Every file a command reads passes through here first. A path that names a named pipe (FIFO), a
device, a socket or anything else but a regular file is refused from its ``stat``, without being
opened, so nothing waits on a pipe nobody writes or reads ``/dev/zero`` for ever; the file is then
opened non-blocking and checked again on the open descriptor, so a path swapped for a pipe in
between is refused too. Each kind of small file has its own limit (named where that kind is read:
``MAX_REPORT_BYTES``, ``MAX_BUNDLE_BYTES``, ``MAX_KEY_BYTES`` ...), checked before reading and
again while reading, since a file may grow in between.

Only the standard library: the CLI's quick commands import this without torch.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from auditor.errors import InputError

__all__ = ["CHUNK", "check_path", "open_regular", "read_small_file", "sha256_file", "write_atomically"]

#: Bytes read at a time when hashing.
CHUNK = 1 << 20

# O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting (only regular files get
# that far, but the path may be swapped between the stat and the open); O_NOCTTY: a terminal path never
# becomes the controlling terminal. Neither exists on Windows, which has no FIFOs to open by path.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)


def _limit_text(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 and limit % (1 << 20) == 0 else f"{limit:,d} bytes"


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _not_regular(path: Path, mode: int) -> InputError:
    kind = _kind(mode)
    if kind == "not a regular file":
        return InputError(path, "not a regular file")
    return InputError(path, f"is {kind}, not a regular file: auditor reads only regular files")


def check_path(path: str | os.PathLike[str], *, what: str, folder_ok: bool = False) -> os.stat_result:
    """``path``'s ``stat`` (links followed) when it names a regular file, or a folder where
    ``folder_ok``; never opens it.

    Raises :class:`~auditor.errors.InputError` naming the path for a missing path ("no such file"),
    a folder where a file belongs ("is a folder, not {what}") and anything else that is not a
    regular file: a named pipe, a device, a socket ("is a named pipe (FIFO), not a regular file").
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(path, "no such file or folder" if folder_ok else "no such file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        if folder_ok:
            return info
        raise InputError(path, f"is a folder, not {what}")
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(path, info.st_mode)
    return info


def open_regular(path: str | os.PathLike[str], *, what: str) -> io.BufferedReader:
    """``path`` opened for binary reading, refused (:class:`~auditor.errors.InputError`, as
    :func:`check_path` words it) unless it is a regular file, before and after opening it.

    A pipe, device or socket is never opened; the open itself never blocks.
    """
    path = Path(path)
    check_path(path, what=what)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise InputError(path, f"is a folder, not {what}")
        if not stat.S_ISREG(mode):  # swapped for a pipe or a device since the stat
            raise _not_regular(path, mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a regular file never blocks; ordinary reads from here on
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small_file(path: str | os.PathLike[str], *, limit: int, what: str) -> bytes:
    """The whole of ``path``, at most ``limit`` bytes, never more read.

    Refuses, with an :class:`~auditor.errors.InputError` naming the file, a missing file, a folder
    ("is a folder, not {what}"), anything but a regular file (a pipe, a device, a socket: never
    opened), and a file over the limit ("the file is too large for {what}"), checked before and
    after reading since the file may grow in between.
    """
    path = Path(path)
    too_large = f"the file is too large for {what} (the limit is {_limit_text(limit)})"
    if check_path(path, what=what).st_size > limit:
        raise InputError(path, too_large)
    try:
        with open_regular(path, what=what) as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise InputError(path, too_large)
    return data


def sha256_file(
    path: str | os.PathLike[str],
    *,
    progress: Callable[[int], None] | None = None,
    limit: int | None = None,
    what: str = "a model file",
) -> str:
    """Hex SHA-256 of a regular file's bytes, reading 1 MiB at a time (memory stays at one chunk).

    ``progress``, if given, is called with the number of bytes of each chunk read. With ``limit``, a
    file over ``limit`` bytes is refused before and while it is read. Refuses what
    :func:`open_regular` refuses (:class:`~auditor.errors.InputError`); a read that fails midway is
    the operating system's :class:`OSError`.
    """
    path = Path(path)
    too_large = f"the file is too large for {what} (the limit is {_limit_text(limit or 0)})"
    if limit is not None and check_path(path, what=what).st_size > limit:
        raise InputError(path, too_large)
    digest = hashlib.sha256()
    read = 0
    with open_regular(path, what=what) as fh:
        while chunk := fh.read(CHUNK):
            read += len(chunk)
            if limit is not None and read > limit:
                raise InputError(path, too_large)
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
