"""The load stage: open a model file or folder with whichever registered format recognises its content,
and hash every file it was read from.

The suspect's bytes are read once for evidence, in the background: each file
is hashed (SHA-256) by a small process of its own (from
:data:`IN_PROCESS_FROM` bytes on; a thread hashes smaller ones), every file of
a sharded checkpoint at once (up to :data:`MAX_HASHING`), while the loader reads the
headers and the detectors read the few tensors they need through the memory
map. A separate process hashes at full speed while this one holds the
interpreter lock (importing torch, dequantising, scoring), so the audit costs
about one pass of hashing spread over the cores rather than hashing plus the
rest. The process is given the descriptor this one opened and checked as a
regular file; where no interpreter can be started, a thread hashes instead.
The size recorded is the number of bytes hashed, and a file whose size,
modification time or inode moved while it was hashed is refused.

The command line starts the hash of the model it names even sooner, with
:func:`prehash`, before its plugins load and its options are parsed; the
:func:`hashed_load` of that file takes the running hash over (same checks,
same errors, one read).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
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
    "HEAD_BYTES", "IN_PROCESS_FROM", "MAX_HASHING", "HashedLoad", "LoadedModel", "detect_format", "hashed_load",
    "is_model", "load_hashed", "load_model", "prehash", "stop_prehashing",
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


#: Most files hashed at once: every file of a sharded checkpoint gets its own hashing process, and the
#: operating system shares the cores between them, so no core idles while the last shard is hashed alone.
MAX_HASHING = 32
#: Files from this size on are hashed by a process of their own; a smaller one (an index, a config, a small
#: model) by a thread, since starting an interpreter costs more than the hash.
IN_PROCESS_FROM = 16 << 20
#: A hashing process reports its progress every this many bytes (and once at the end).
PROGRESS_STEP = 64 << 20

# The hashing process: the standard library only, started isolated (-I: no environment variables, no
# user site, not the current folder on the path; -S: no site) on a descriptor the parent opened and
# checked. It reads no further than the size the file had when opened (a file that grows for ever is not
# hashed for ever; one that grew is refused below), reports progress as "+N", the digest as "= SHA256 SIZE",
# a read error as "! ERRNO TEXT", and stops when its parent is gone.
_CHILD = r"""
import hashlib, os, sys
fd, parent, step, end = (int(a) for a in sys.argv[1:5])
digest, buf = hashlib.sha256(), bytearray(1 << 20)
view, size, told = memoryview(buf), 0, 0
try:
    while size < end and (n := os.preadv(fd, [view[: end - size]], size)):
        digest.update(view[:n])
        size += n
        if size - told >= step:
            if os.getppid() != parent:
                sys.exit(3)
            print(f"+{size - told}", flush=True)
            told = size
except OSError as exc:
    print(f"! {exc.errno} {exc.strerror}", flush=True)
    sys.exit(1)
print(f"+{size - told}\n= {digest.hexdigest()} {size}", flush=True)
"""


def _in_processes() -> bool:
    # A separate process hashes without the interpreter lock that loading and detection hold; where no
    # interpreter can be started (an embedded Python, no pass_fds or preadv), a thread hashes instead.
    return bool(sys.executable) and os.name == "posix" and hasattr(os, "preadv")


class _Hasher:
    """SHA-256 of files while the caller works: each file read once, a large one in a process of its own (up
    to :data:`MAX_HASHING` at once); :meth:`close` stops any hash no one will wait for."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=MAX_HASHING, thread_name_prefix="auditor-hash")
        self._stop = threading.Event()
        self._jobs: dict[Path, Future[tuple[str, int]]] = {}
        self._children: set[subprocess.Popen[str]] = set()
        self._lock = threading.Lock()

    def _hash(self, path: Path, progress: Callable[[int], None] | None) -> tuple[str, int]:
        from auditor.safeio import open_regular

        with open_regular(path, what="a model file") as fh:
            before = os.fstat(fh.fileno())
            own = before.st_size >= IN_PROCESS_FROM and _in_processes()
            hashed = self._hash_in_process(path, fh.fileno(), before.st_size, progress) if own else None
            sha, size = hashed or self._hash_here(fh, before.st_size, progress)
            after = os.fstat(fh.fileno())
        try:
            now = os.stat(path)
        except FileNotFoundError:
            raise InputError(path, "no such file (it disappeared while being read)") from None
        moved = (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or size != after.st_size
        if moved or (now.st_dev, now.st_ino) != (after.st_dev, after.st_ino):
            raise InputError(
                path, "changed while it was being hashed (its size, modification time or inode moved):"
                " audit a copy that nothing writes to"
            )  # fmt: skip
        return sha, size

    def _tell(self, n: int, progress: Callable[[int], None] | None) -> None:
        if self._stop.is_set():
            raise _Stopped
        if progress is not None:
            progress(n)

    def _hash_here(self, fh: io.BufferedReader, end: int, progress: Callable[[int], None] | None) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        view = memoryview(bytearray(4 << 20))  # larger reads: fewer waits for the interpreter lock
        while size < end and (n := fh.readinto(view[: end - size])):
            digest.update(view[:n])
            size += n
            self._tell(n, progress)
        return digest.hexdigest(), size

    def _hash_in_process(
        self, path: Path, fd: int, end: int, progress: Callable[[int], None] | None
    ) -> tuple[str, int] | None:
        """The digest and size from a hashing process; ``None`` when none can be started (a thread hashes)."""
        argv = [sys.executable, "-I", "-S", "-c", _CHILD, *map(str, (fd, os.getpid(), PROGRESS_STEP, end))]
        with self._lock:
            if self._stop.is_set():
                raise _Stopped
            try:
                child = subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)  # fmt: skip
            except OSError:  # no interpreter at sys.executable, or no process may be started here
                return None
            self._children.add(child)
        result: tuple[str, int] | None = None
        failed = ""
        stdout, stderr = child.stdout, child.stderr
        assert stdout is not None and stderr is not None
        try:
            for line in stdout:
                if line.startswith("+"):
                    self._tell(int(line[1:]), progress)
                elif line.startswith("= "):
                    sha, size = line[2:].split()
                    result = (sha, int(size))
                elif line.startswith("! "):
                    failed = line[2:].strip().partition(" ")[2]
            code = child.wait()
            why = stderr.read().strip().splitlines()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            stdout.close()
            stderr.close()
            with self._lock:
                self._children.discard(child)
        if self._stop.is_set():
            raise _Stopped
        if failed:
            raise InputError(path, f"cannot be read: {failed}")
        if result is None or code != 0:
            last = f": {why[-1][:200]}" if why else ""
            raise AuditorError(f"{path}: the process hashing it ended without a result (exit code {code}){last}")
        return result

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
        with self._lock:
            self._stop.set()
            for child in self._children:
                child.kill()
        self._pool.shutdown(wait=True)


class _Relay:
    """A progress callback for a hash started before anyone listens: what it is told meanwhile is kept and
    passed on in one call once a listener is attached."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._target: Callable[[int], None] | None = None
        self._kept = 0
        self._attached = False

    def __call__(self, n: int) -> None:
        with self._lock:
            if not self._attached:
                self._kept += n
                return
            target = self._target
        if target is not None:
            target(n)

    def attach(self, target: Callable[[int], None] | None) -> None:
        with self._lock:
            kept, self._kept, self._target, self._attached = self._kept, 0, target, True
        if target is not None and kept:
            target(kept)


#: Hashes :func:`prehash` started, by resolved path, each in a hasher of its own until a load takes it over.
_early: dict[Path, tuple[_Hasher, _Relay]] = {}


def prehash(path: Path) -> bool:
    """Start hashing ``path`` now, for a later :func:`hashed_load` of the same file in this process to take
    over; whether a hash started.

    Only a regular file of :data:`IN_PROCESS_FROM` bytes or more (a smaller one hashes in less time than the
    start saves). Never raises and never opens anything but a regular file (the hash opens it as
    :func:`hashed_load` does, with the same checks): a path that is missing, a folder, a pipe or unreadable is
    left for the load to find and report. A hash no load takes over is stopped by :func:`stop_prehashing`."""
    try:
        st = os.stat(path)
        key = path.resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size < IN_PROCESS_FROM or key in _early:
        return False
    hasher, relay = _Hasher(), _Relay()
    _early[key] = (hasher, relay)
    hasher.start(path, relay)
    return True


def _taken_over(path: Path) -> tuple[_Hasher, _Relay] | None:
    # A hash of this very file that the command line started already (the resolved path, as _Hasher keys it).
    if not _early:
        return None
    try:
        return _early.pop(path.resolve(), None)
    except (OSError, RuntimeError, ValueError):
        return None


def stop_prehashing() -> None:
    """Stop every hash :func:`prehash` started that no load took over (a command that ended before its
    load, or a path that was not the model after all)."""
    while _early:
        _early.popitem()[1][0].close()


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
    early = _taken_over(path)
    hasher = early[0] if early is not None else _Hasher()
    try:
        if early is not None:
            early[1].attach(progress)
        elif path.is_file():
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
