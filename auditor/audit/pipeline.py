"""One audit, start to end: load the inputs safely, hash each file once, restore, detect.

The suspect's bytes are read once for evidence: its SHA-256 is computed in a
background thread (hashlib releases the interpreter lock) while the loader
reads the header and the detectors read the few tensors they need through the
memory map, so on a machine with two cores the audit costs about one pass of
hashing over the file. The size recorded is the number of bytes hashed.
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auditor.bundle import OwnerBundle
from auditor.errors import (
    EXIT_INCONCLUSIVE,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PLUGIN,
    EXIT_UNSAFE,
    InputError,
    UsageError,
)
from auditor.findings import Finding, Verdict
from auditor.graph import LayerGraph

__all__ = [
    "BATCH_SEVERITY",
    "EXIT_FOR_VERDICT",
    "AuditInputs",
    "AuditRecord",
    "LoadedModel",
    "audit_suspect",
    "batch_exit_code",
    "expand_suspects",
    "load_inputs",
    "load_hashed",
    "report_names",
]

EXIT_FOR_VERDICT = {
    Verdict.DETECTED.value: EXIT_OK,
    Verdict.NOT_DETECTED.value: EXIT_NOT_FOUND,
    Verdict.INCONCLUSIVE.value: EXIT_INCONCLUSIVE,
}
#: Several suspects: the exit code is the first of these that any file gave. A file that could not be
#: audited makes the batch incomplete, so errors come first; then one detection makes the batch a
#: detection; an inconclusive file keeps it from being declared clean.
BATCH_SEVERITY = (EXIT_INTERNAL, EXIT_PLUGIN, EXIT_UNSAFE, EXIT_INPUT, EXIT_OK, EXIT_INCONCLUSIVE, EXIT_NOT_FOUND)


class _Stopped(Exception):
    pass


class _Hasher:
    """SHA-256 of files in one background thread; :meth:`close` stops a hash no one will wait for."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auditor-hash")
        self._stop = threading.Event()
        self._jobs: dict[Path, Future[tuple[str, int]]] = {}

    def _hash(self, path: Path, progress: Callable[[int], None] | None) -> tuple[str, int]:
        from auditor.hashing import sha256_file

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


def load_hashed(
    path: Path, work: Callable[[LayerGraph], Any] | None = None, progress: Callable[[int], None] | None = None
) -> tuple[LoadedModel, Any]:
    """Load ``path`` and hash its files while ``work(graph)`` runs; the model and what ``work`` returned."""
    from auditor.audit.load import load_model

    hasher = _Hasher()
    try:
        if path.is_file():
            hasher.start(path, progress)  # before the load: the hash overlaps everything that follows
        graph = load_model(path)
        for f in graph.files:
            hasher.start(Path(f), progress)
        result = work(graph) if work is not None else None
        files = [_named(Path(f), hasher.result(Path(f)), path) for f in graph.files]
    finally:
        hasher.close()
    return LoadedModel(path=path, graph=graph, files=files), result


@dataclass
class AuditInputs:
    """What every suspect of one audit is checked against, and the detectors' options as given."""

    bundles: list[OwnerBundle]
    reference: LoadedModel | None = None
    bundle_paths: list[Path] = field(default_factory=list)
    #: Detector id -> option name -> value, validated against the detector's :attr:`~auditor.bases.Param` list;
    #: only the options the user set (each detector fills in its own defaults).
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def reference_entry(self) -> dict[str, Any] | None:
        """The report's description of the reference model, or ``None``."""
        from auditor.jsondata import jsonable

        return None if self.reference is None else jsonable(self.reference.entry())

    def command(self, *suspects: Path) -> str:
        """The command that reproduces the audit of ``suspects``, with every option that changes its result."""
        args = ["auditor", "audit", *map(str, suspects)]
        for p in self.bundle_paths:
            args += ["--bundle", str(p)]
        if self.reference is not None:
            args += ["--reference", str(self.reference.path)]
        for detector_id, values in sorted(self.options.items()):
            for name, value in sorted(values.items()):
                args += ["--option", f"{detector_id}.{name}={_option_text(value)}"]
        return shlex.join(args)


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def parse_detector_options(given: Mapping[str, Any] | Sequence[str]) -> dict[str, dict[str, Any]]:
    """Detector options, validated once against the registered detectors' parameters.

    ``given`` is either ``ID.NAME=VALUE`` strings (the command line's ``--option``) or a mapping from
    ``ID.NAME`` to a value. An unknown detector or option, or a value of the wrong kind, is a
    :class:`~auditor.errors.UsageError` that names the choices."""
    from auditor.bases import Detector
    from auditor.plugin_manager import components

    detectors = {d.id: d for d in components("detectors", Detector)}
    pairs: list[tuple[str, Any]] = []
    if isinstance(given, Mapping):
        pairs = [(str(k), v) for k, v in given.items()]
    else:
        for item in given:
            name, sep, value = str(item).partition("=")
            if not sep:
                raise UsageError(f"--option {item!r}: write it as DETECTOR.NAME=VALUE")
            pairs.append((name.strip(), value))
    options: dict[str, dict[str, Any]] = {}
    for key, value in pairs:
        detector_id, dot, name = key.rpartition(".")
        if not dot or not detector_id or not name:
            raise UsageError(f"--option {key!r}: name the detector and the option, as DETECTOR.NAME=VALUE")
        detector = detectors.get(detector_id)
        if detector is None:
            raise UsageError(f"--option {key!r}: no detector {detector_id!r}; installed: {', '.join(detectors)}")
        param = {p.name: p for p in detector.params}.get(name.replace("-", "_"))
        if param is None:
            known = ", ".join(p.name for p in detector.params) or "none"
            raise UsageError(f"--option {key!r}: detector {detector_id!r} has no option {name!r}; its options: {known}")
        options.setdefault(detector_id, {})[param.name] = param.convert(value, detector_id)
    return options


def load_inputs(
    *, bundles: Sequence[Path], reference: Path | None, options: Mapping[str, Any] | Sequence[str] = ()
) -> AuditInputs:
    """Check the detector options, then load the owner bundles (sorted by scheme and SHA-256) and the
    reference model, hashed."""
    from auditor.bundle import load_bundle

    parsed = parse_detector_options(options)
    loaded = sorted((load_bundle(p) for p in bundles), key=lambda b: (b.scheme, b.sha256))
    ref = load_hashed(reference)[0] if reference is not None else None
    return AuditInputs(bundles=loaded, reference=ref, bundle_paths=list(bundles), options=parsed)


@dataclass
class AuditRecord:
    """One suspect's audit: the model as loaded and hashed, the restore log, the findings and the verdict."""

    path: Path
    graph: LayerGraph
    files: list[dict[str, Any]]
    restore: list[dict[str, Any]]
    findings: list[Finding]
    verdict: Verdict


def audit_suspect(path: Path, inputs: AuditInputs, progress: Callable[[int], None] | None = None) -> AuditRecord:
    """Load ``path`` safely, restore it against the reference (if any), and run every applicable detector."""
    from auditor.audit.detect import overall_verdict, run_detectors
    from auditor.audit.restore import run_restorers

    def work(graph: LayerGraph) -> tuple[list[dict[str, Any]], list[Finding]]:
        log: list[dict[str, Any]] = []
        if inputs.reference is not None:
            graph, log = run_restorers(graph, inputs.reference.graph)
        return log, run_detectors(graph, bundles=inputs.bundles, options=inputs.options)

    model, (log, findings) = load_hashed(path, work, progress)
    return AuditRecord(path, model.graph, model.files, log, findings, overall_verdict(findings))


def _is_model_folder(path: Path) -> bool:
    from auditor.audit.load import detect_format

    try:
        detect_format(path)
    except InputError:
        return False
    return True


def expand_suspects(paths: Sequence[Path]) -> tuple[list[Path], bool]:
    """The suspects named on the command line, a folder that is no model standing for the entries in it
    (sorted by name, hidden ones left out); and whether this is a batch (several suspects)."""
    out: list[Path] = []
    batch = len(paths) > 1
    for p in paths:
        if p.is_dir() and not _is_model_folder(p):
            batch = True
            entries = sorted((c for c in p.iterdir() if not c.name.startswith(".")), key=lambda c: c.name)
            if not entries:
                raise UsageError(f"{p}: the folder holds no suspect files")
            out.extend(entries)
        else:
            out.append(p)
    return out, batch


def batch_exit_code(codes: Sequence[int]) -> int:
    """The batch's exit code: the most serious of the files' codes (:data:`BATCH_SEVERITY`)."""
    return next((c for c in BATCH_SEVERITY if c in codes), EXIT_INTERNAL)


def report_names(paths: Sequence[Path]) -> list[str]:
    """A distinct, file-system-safe report stem per suspect (``name``, ``name-2``... in order)."""
    used: set[str] = {"summary"}
    names = []
    for p in paths:
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in p.name).strip(".") or "suspect"
        name, n = stem, 1
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        names.append(name)
    return names


def verdict_of(findings: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Scheme, detector and verdict of each finding (the summary's columns)."""
    return [{"scheme": f["scheme"], "detector": f["detector"], "verdict": f["verdict"]} for f in findings]
