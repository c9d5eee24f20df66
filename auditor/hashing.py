"""File hashing for evidence: SHA-256 read in bounded chunks."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["CHUNK", "sha256_file"]

CHUNK = 1 << 20


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
