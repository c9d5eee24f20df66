"""The load stage: open a model file or folder with whichever registered format recognises its content,
and hash every file it was read from.

The suspect's bytes are read once for evidence: their SHA-256 is computed in
background threads (hashlib releases the interpreter lock; one thread per
core, each on its own file, so a sharded checkpoint is hashed on every core)
while the loader reads the header and the detectors read the few tensors they
need through the memory map, so the audit costs about one pass of hashing
over the files spread over the cores. The size recorded is the number of
bytes hashed.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditor.bases import Format
from auditor.errors import AuditorError, InputError, LoaderBugError
from auditor.graph import LayerGraph
from auditor.plugin_manager import components

__all__ = [
    "HEAD_BYTES", "HashedLoad", "LoadedModel", "detect_format", "hashed_load", "is_model", "load_hashed", "load_model",
]  # fmt: skip

#: How many leading bytes a format's ``sniff`` sees.
HEAD_BYTES = 64


def _formats() -> list[Format]:
    return sorted(components("formats", Format), key=lambda f: (-f.priority, f.id))


def _head(path: Path) -> bytes:
    # A folder, or a regular file opened without blocking: a pipe or a device named as a model (or a
    # link to one) is refused from its stat, unopened, so nothing waits on it or reads /dev/zero.
    from auditor.safeio import check_path, open_regular

    if not path.exists() and not path.is_symlink():
        raise InputError(path, "no such file or folder")
    if stat.S_ISDIR(check_path(path, what="a model", folder_ok=True).st_mode):
        return b""
    try:
        with open_regular(path, what="a model") as fh:
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
    file and the problem; never runs code from the file. An exception the
    loader did not raise on purpose becomes :class:`~auditor.errors.LoaderBugError`
    (still exit 4 for the user; a bug for the fuzz tests).
    """
    p = Path(path)
    fmt = detect_format(p)
    try:
        return _bounded_notes(fmt.load(p))
    except AuditorError:
        raise
    except MemoryError:
        raise InputError(p, f"too large to load as {fmt.id} with the memory available") from None
    except RecursionError:
        raise InputError(p, f"nested too deeply to read as {fmt.id}") from None
    except Exception as exc:  # a loader bug still reaches the user as one line; the fuzz tests fail on it
        raise LoaderBugError(p, f"could not be read as {fmt.id}: {type(exc).__name__}: {exc}") from exc


#: A loader may note something per tensor (a dtype it skips); a hostile file of 200,000 such tensors must not
#: put 200,000 lines into every report. Past this many, the rest are counted in one last note.
MAX_NOTES = 100


def _bounded_notes(graph: LayerGraph) -> LayerGraph:
    if len(graph.notes) > MAX_NOTES:
        rest = len(graph.notes) - (MAX_NOTES - 1)
        graph.notes[MAX_NOTES - 1 :] = [
            f"... and {rest:,d} more loader notes, left out (the first {MAX_NOTES - 1} are above)"
        ]
    return graph


def is_model(path: Path) -> bool:
    """Whether some registered format recognises ``path`` (a file or a folder)."""
    try:
        detect_format(path)
    except InputError:
        return False
    return True


class _Stopped(Exception):
    pass


def hash_workers() -> int:
    """Threads that hash a model's files: one per core this process may run on (hashlib releases the
    interpreter lock, so a sharded checkpoint is hashed on every core; one file is still one thread)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 32))


class _Hasher:
    """SHA-256 of files in background threads, one file per thread at a time; :meth:`close` stops a hash no
    one will wait for."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=hash_workers(), thread_name_prefix="auditor-hash")
        self._stop = threading.Event()
        self._jobs: dict[Path, Future[tuple[str, int]]] = {}

    def _hash(self, path: Path, progress: Callable[[int], None] | None) -> tuple[str, int]:
        from auditor.safeio import sha256_file

        size = 0

        def count(n: int) -> None:
            nonlocal size
            if self._stop.is_set():
                raise _Stopped
            size += n
            if progress is not None:
                progress(n)

        return sha256_file(path, progress=count), size

    def start(self, path: Path, progress: Callable[[int], None] | None = None) -> None:
        key = path.resolve()  # the loader may name the file differently; it is still one read
        if key not in self._jobs:
            self._jobs[key] = self._pool.submit(self._hash, path, progress)

    def result(self, path: Path) -> dict[str, Any]:
        self.start(path)
        try:
            sha, size = self._jobs[path.resolve()].result()
        except FileNotFoundError:
            raise InputError(path, "no such file (it disappeared while being read)") from None
        except OSError as exc:
            raise InputError(path, f"cannot be read: {exc.strerror or exc}") from None
        return {"path": str(path), "size": size, "sha256": sha}

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)


@dataclass
class LoadedModel:
    """A model loaded safely, with every file it was read from hashed (``files``: name, path, size, sha256)."""

    path: Path
    graph: LayerGraph
    files: list[dict[str, Any]]

    def entry(self) -> dict[str, Any]:
        """The report's description of the model (no weights)."""
        single = len(self.files) == 1 and self.path.is_file()
        return {
            "name": self.path.name, "path": str(self.path), "format": self.graph.format,
            "size": sum(f["size"] for f in self.files), "sha256": self.files[0]["sha256"] if single else None,
            "files": self.files, "layers": len(self.graph.layers), "parameters": self.graph.parameter_count,
        }  # fmt: skip


def _named(path: Path, info: dict[str, Any], root: Path) -> dict[str, Any]:
    try:
        name = str(path.relative_to(root)) if root.is_dir() else path.name
    except ValueError:
        name = path.name
    return {"name": name, **info}


@contextmanager
def hashed_load(path: Path, progress: Callable[[int], None] | None = None) -> Iterator[HashedLoad]:
    """Load ``path`` safely while its files are hashed in the background; ``finish()`` waits for the hashes.

    The hash starts before the load, so it overlaps everything done with the graph inside the ``with``
    block (restore and detection read a few tensors; hashing reads every byte once)::

        with hashed_load(path) as loading:
            findings = detect(loading.graph)
            model = loading.finish()
    """
    hasher = _Hasher()
    try:
        if path.is_file():
            hasher.start(path, progress)
        graph = load_model(path)
        for f in graph.files:
            hasher.start(Path(f), progress)
        yield HashedLoad(path, graph, hasher)
    finally:
        hasher.close()


@dataclass
class HashedLoad:
    """A model being hashed: its graph now, its :class:`LoadedModel` (with the hashes) from :meth:`finish`."""

    path: Path
    graph: LayerGraph
    _hasher: _Hasher

    def finish(self) -> LoadedModel:
        """Wait for the hashes; the model as loaded, with every file it was read from."""
        files = [_named(Path(f), self._hasher.result(Path(f)), self.path) for f in self.graph.files]
        return LoadedModel(path=self.path, graph=self.graph, files=files)


def load_hashed(path: Path, progress: Callable[[int], None] | None = None) -> LoadedModel:
    """Load ``path`` safely and hash every file it was read from."""
    with hashed_load(path, progress) as loading:
        return loading.finish()
