"""The batch result cache: what a suspect's audit gave, kept in SQLite so that a re-run skips what is done.

A result is stored under a key (:func:`result_key`) made of everything it depends on: the suspect's
content (its SHA-256; a folder model's files' SHA-256s), the command that reproduces its audit (the
suspect, bundle, reference, control and calibration paths as named and every detector option), the
SHA-256 of every owner bundle, of the reference's files, of the negative controls' files and of the
calibration files, and the tool's, its dependencies' and its plugins' versions. Change any of them and
the suspect is audited again.

Knowing a suspect's SHA-256 means reading it, which for a large file is most of an audit's cost. So the
cache also remembers, per path, the SHA-256 a file had together with what ``stat`` said of it then
(device, inode, size, modification and change times in nanoseconds; a folder model: the folder and
each of its files). Where every one of those is unchanged, the file is not read again; the change time
(``ctime``) cannot be set back by a user, so a file rewritten and given its old modification time is
still read again. ``--refresh`` audits everything again regardless.

Each result is committed as it arrives, so a run that stops (Ctrl-C, a killed worker, a lost node, a
power cut) loses at most the suspects that were being audited; the next run with the same inputs takes
the rest from here. One row per key: a result that arrives twice replaces itself.

The file holds reports' data (never a signing key, never secret bundle material, which no report holds)
and is as trustworthy as the folder it is in: for evidence to be filed, audit with ``--refresh`` or
``--no-cache``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from auditor.errors import UsageError

__all__ = ["CACHE_VERSION", "ResultCache", "default_cache_path", "file_stats", "result_key", "suspect_digest"]

#: Bumped when what a cached result holds changes; older rows are then never matched.
CACHE_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, path TEXT NOT NULL, sha256 TEXT NOT NULL,
                                    result TEXT NOT NULL, stored REAL NOT NULL);
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, stats TEXT NOT NULL, sha256 TEXT NOT NULL);
"""


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/auditor/results.sqlite`` (``~/.cache/auditor/results.sqlite`` when it is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "auditor" / "results.sqlite"


def _stat(path: Path) -> list[Any]:
    st = os.stat(path)
    return [str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_stats(path: Path, files: Sequence[Mapping[str, Any]] = ()) -> list[list[Any]] | None:
    """What ``stat`` says of ``path`` and of each of ``files`` (a report's file entries: their ``path``),
    taken before they are read; ``None`` where one cannot be stat'ed."""
    try:
        found = [_stat(Path(path).absolute())]
        found += [_stat(Path(str(f["path"])).absolute()) for f in files if Path(str(f["path"])) != Path(path)]
    except (OSError, KeyError, ValueError):
        return None
    return found


def suspect_digest(files: Sequence[Mapping[str, Any]]) -> str | None:
    """The suspect's content digest: its file's SHA-256, or for a folder model the SHA-256 of its files'
    names and SHA-256s in order; ``None`` when a file has no SHA-256."""
    if any(not isinstance(f.get("sha256"), str) for f in files) or not files:
        return None
    if len(files) == 1:
        return str(files[0]["sha256"])
    text = "\n".join(f"{f.get('name')}\t{f['sha256']}" for f in files)
    return hashlib.sha256(text.encode()).hexdigest()


def result_key(*, suspect_sha256: str, command: str, inputs: Mapping[str, Any]) -> str:
    """The key of one suspect's result: SHA-256 of the canonical JSON of its content digest, the command
    that reproduces its audit and ``inputs`` (the batch's input hashes, versions and options)."""
    material = {"cache_version": CACHE_VERSION, "suspect_sha256": suspect_sha256, "command": command, **inputs}
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


class ResultCache:
    """The SQLite file at ``path`` (created with its folder on first use). ``refresh``: look nothing up,
    store everything anew."""

    def __init__(self, path: Path, *, refresh: bool = False) -> None:
        self.path = Path(path)
        self.refresh = refresh
        #: Results taken from the file, and results stored in it, by this object.
        self.hits = self.stored = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise UsageError(f"--cache {self.path}: cannot use it as a result cache: {exc}") from None

    def close(self) -> None:
        """Close the file (every result is already committed)."""
        self._db.close()

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def known_sha256(self, path: Path) -> str | None:
        """The content digest remembered for ``path`` if ``stat`` says that it and its files are unchanged."""
        if self.refresh:
            return None
        row = self._one("SELECT stats, sha256 FROM files WHERE path = ?", str(Path(path).absolute()))
        if row is None:
            return None
        try:
            stats = json.loads(row[0])
            unchanged = all(_stat(Path(s[0])) == s for s in stats)
        except (OSError, ValueError, TypeError, IndexError):
            return None
        return str(row[1]) if unchanged else None

    def get(self, key: str) -> dict[str, Any] | None:
        """The result stored under ``key`` (as it was stored), or ``None``."""
        if self.refresh:
            return None
        row = self._one("SELECT result FROM results WHERE key = ?", key)
        if row is None:
            return None
        try:
            result = json.loads(row[0])
        except ValueError:
            return None
        if not isinstance(result, dict):
            return None
        self.hits += 1
        return result

    def _one(self, query: str, value: str) -> Any:
        try:
            return self._db.execute(query, (value,)).fetchone()
        except sqlite3.Error as exc:
            raise UsageError(f"--cache {self.path}: cannot read the result cache: {exc}") from None

    def put(
        self, key: str, *, path: Path, sha256: str, result: Mapping[str, Any], stats: list[list[Any]] | None
    ) -> None:
        """Store ``result`` under ``key`` and remember ``path``'s digest with the ``stats`` taken before it
        was read; one transaction, committed before this returns."""
        text = json.dumps(result, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT OR REPLACE INTO results (key, path, sha256, result, stored) VALUES (?, ?, ?, ?, ?)",
                    (key, str(path), sha256, text, time.time()),
                )
                if stats is not None:
                    self._db.execute(
                        "INSERT OR REPLACE INTO files (path, stats, sha256) VALUES (?, ?, ?)",
                        (str(Path(path).absolute()), json.dumps(stats), sha256),
                    )
        except sqlite3.Error as exc:
            raise UsageError(f"--cache {self.path}: cannot store a result: {exc}") from None
        self.stored += 1

    def count(self) -> int:
        """How many results the file holds."""
        return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
