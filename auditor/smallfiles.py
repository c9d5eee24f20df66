"""Reading a small file a user hands over (a key, an owner bundle, a report) as hostile input."""

from __future__ import annotations

import stat
from pathlib import Path

from auditor.errors import InputError

__all__ = ["read_small_file"]


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
