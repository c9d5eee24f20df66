"""Open a model file or folder with whichever registered format recognises its content."""

from __future__ import annotations

import os
from pathlib import Path

from auditor.bases import Format
from auditor.errors import AuditorError, InputError
from auditor.graph import LayerGraph
from auditor.plugin_manager import components

__all__ = ["HEAD_BYTES", "detect_format", "load_model"]

#: How many leading bytes a format's ``sniff`` sees.
HEAD_BYTES = 64


def _formats() -> list[Format]:
    return sorted(components("formats", Format), key=lambda f: (-f.priority, f.id))


def _head(path: Path) -> bytes:
    if not path.exists() and not path.is_symlink():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        return b""
    if not path.is_file():
        raise InputError(path, "not a regular file or folder")
    try:
        with path.open("rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError as exc:
        raise InputError(path, f"cannot be read: {exc.strerror or exc}") from None
    if not head:
        raise InputError(path, "the file is empty")
    return head


def detect_format(path: str | os.PathLike[str]) -> Format:
    """The format whose content sniff accepts ``path``; the file name plays no part."""
    p = Path(path)
    head = _head(p)
    for fmt in _formats():
        try:
            matched = fmt.sniff(p, head)
        except Exception:  # a sniff must never sink the load; treat it as "not mine"
            matched = False
        if matched:
            return fmt
    names = ", ".join(f.id for f in _formats())
    if p.is_dir():
        raise InputError(p, f"the folder holds no model auditor recognises (formats: {names})")
    shown = head[:16].hex(" ")
    raise InputError(p, f"not a model format auditor recognises (formats: {names}); it starts with bytes {shown}")


def load_model(path: str | os.PathLike[str]) -> LayerGraph:
    """Load ``path`` into a :class:`LayerGraph`, refusing anything unsafe.

    Raises :class:`~auditor.errors.InputError` (or its subclass
    :class:`~auditor.errors.UnsafeInputError`) with one line that names the
    file and the problem; never runs code from the file.
    """
    p = Path(path)
    fmt = detect_format(p)
    try:
        return fmt.load(p)
    except AuditorError:
        raise
    except MemoryError:
        raise InputError(p, f"too large to load as {fmt.id} with the memory available") from None
    except RecursionError:
        raise InputError(p, f"nested too deeply to read as {fmt.id}") from None
    except Exception as exc:  # a loader bug still reaches the user as one line
        raise InputError(p, f"could not be read as {fmt.id}: {type(exc).__name__}: {exc}") from exc
