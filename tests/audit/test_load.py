"""The load stage's catch-all: an exception a loader did not raise on purpose still reaches the user as one
line and exit code 4, but marked as a loader bug (``LoaderBugError``, ``internal``) so that the fuzz tests
fail on it; a loader's own InputError passes through unmarked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from auditor import hookimpl
from auditor.audit.load import load_model
from auditor.bases import Format
from auditor.errors import EXIT_INPUT, InputError, LoaderBugError
from auditor.graph import LayerGraph


class BrokenFormat(Format):
    """Claims files that start with BROKEN and fails on them as the file's last byte says."""

    id = "broken-test"
    description = "a format whose loader fails"
    priority = 1000

    def sniff(self, path: Path, head: bytes) -> bool:
        return head.startswith(b"BROKEN")

    def load(self, path: Path) -> LayerGraph:
        if path.read_bytes().endswith(b"!"):
            raise InputError(path, "the loader refuses it on purpose")
        layers: dict[str, LayerGraph] = {}
        return layers["no such key"]  # a bug in the loader


class Plugin:
    @hookimpl
    def register_formats(self, register: Callable[[Format], None]) -> None:
        register(BrokenFormat())


def test_an_unanticipated_exception_is_a_loader_bug_with_exit_code_4(
    tmp_path: Path, plugin: Callable[..., Any], run_cli: Callable[..., Any]
) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"BROKEN model")
    with plugin(Plugin()):
        with pytest.raises(LoaderBugError) as caught:
            load_model(model)
        code, _, stderr = run_cli("inspect", model)
    assert caught.value.internal and caught.value.exit_code == EXIT_INPUT
    assert str(caught.value) == f"{model}: could not be read as broken-test: KeyError: 'no such key'"
    assert code == EXIT_INPUT
    assert stderr.splitlines() == [f"error: {model}: could not be read as broken-test: KeyError: 'no such key'"]


def test_a_deliberate_input_error_is_not_marked(tmp_path: Path, plugin: Callable[..., Any]) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"BROKEN model!")
    with plugin(Plugin()), pytest.raises(InputError) as caught:
        load_model(model)
    assert type(caught.value) is InputError and not caught.value.internal
    assert caught.value.problem == "the loader refuses it on purpose"


def test_a_file_with_thousands_of_loader_notes_gives_a_bounded_list(tmp_path: Path) -> None:
    """A loader notes each tensor it skips; 5,000 such tensors give MAX_NOTES notes, the last one counting the rest."""
    import json
    import struct

    from auditor.audit.load import MAX_NOTES, load_model

    header = {f"t{i}": {"dtype": "F8_E5M2_FNUZ_BOGUS", "shape": [1], "data_offsets": [i, i + 1]} for i in range(5000)}
    header["w"] = {"dtype": "F32", "shape": [1], "data_offsets": [5000, 5004]}
    raw = json.dumps(header).encode()
    path = tmp_path / "many.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(5004))
    graph = load_model(path)
    assert len(graph.notes) == MAX_NOTES
    assert sum("which auditor does not read; skipped" in n for n in graph.notes) == MAX_NOTES - 1
    left_out = int(graph.notes[-1].split()[2].replace(",", ""))
    assert graph.notes[-1].startswith("... and ") and left_out >= 5000 - (MAX_NOTES - 1)


# -- hashing alongside the load -------------------------------------------------------------------------------


def _sharded(folder: Path, shards: int = 3) -> list[Path]:
    """A sharded safetensors checkpoint as save_pretrained writes it (each shard a little over 1 MiB, so the
    hashing reads each in several pieces); the shard paths."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir()
    rng = np.random.default_rng(5)
    weight_map, paths = {}, []
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"layers.{i}.weight": rng.standard_normal((300 + i, 1024)).astype(np.float32)}
        save_file(tensors, str(folder / name))
        weight_map |= dict.fromkeys(tensors, name)
        paths.append(folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return paths


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def in_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file hashed by a process of its own, however small (the test files are about 1 MiB)."""
    monkeypatch.setattr("auditor.audit.load.IN_PROCESS_FROM", 0)


@pytest.mark.parametrize("where", ["process", "thread"])
def test_hashes_taken_while_the_tensors_are_read_are_hashlibs_over_every_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    from auditor.audit.load import hashed_load

    if where == "process":
        monkeypatch.setattr("auditor.audit.load.IN_PROCESS_FROM", 0)
    shards = _sharded(tmp_path / "model")
    told: list[int] = []
    with hashed_load(tmp_path / "model", progress=told.append) as loading:
        for layer in loading.graph.layers:  # the detectors' reads, while the files are hashed
            for ref in layer.params.values():
                assert ref.read(float32=True).shape == ref.shape
        model = loading.finish()
    files = sorted(model.graph.files)
    assert sorted(Path(f["path"]) for f in model.files) == files and len(files) == 4  # the index and 3 shards
    for f in model.files:
        path = Path(f["path"])
        assert (f["sha256"], f["size"]) == (_sha256(path), path.stat().st_size)
    assert sum(told) == sum(p.stat().st_size for p in files)
    assert {f["name"] for f in model.files} >= {p.name for p in shards}


@pytest.mark.parametrize("executable", ["", "no-such-python"])
def test_a_thread_hashes_where_no_interpreter_can_be_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, executable: str, in_processes: None
) -> None:
    """An embedded Python has no ``sys.executable`` (or one that cannot be started): a thread reads the same
    bytes and gives the same digests."""
    from auditor.audit.load import load_hashed

    _sharded(tmp_path / "model")
    monkeypatch.setattr("sys.executable", str(tmp_path / executable) if executable else "")
    model = load_hashed(tmp_path / "model")
    assert all(f["sha256"] == _sha256(Path(f["path"])) for f in model.files)


@pytest.mark.parametrize("executable", ["python", ""])
def test_a_file_that_changes_while_it_is_hashed_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, executable: str, in_processes: None
) -> None:
    """The progress report comes from the hash; a byte appended then is after (or in) what was hashed, and
    the evidence would not be of the file as it stands: refused, with one line naming the file."""
    from auditor.audit.load import load_hashed

    path = _sharded(tmp_path / "model", shards=1)[0]
    single = tmp_path / "single.safetensors"
    path.rename(single)
    path_size = single.stat().st_size
    if not executable:
        monkeypatch.setattr("sys.executable", "")

    def append(n: int) -> None:
        if single.stat().st_size == path_size:
            with single.open("ab") as fh:
                fh.write(b"!")

    with pytest.raises(InputError) as caught:
        load_hashed(single, progress=append)
    assert str(caught.value) == (
        f"{single}: changed while it was being hashed (its size, modification time or inode moved): audit a copy"
        " that nothing writes to"
    )


def test_an_error_in_the_hashing_thread_reaches_the_caller(tmp_path: Path, in_processes: None) -> None:
    from auditor.audit.load import load_hashed

    path = _sharded(tmp_path / "model", shards=1)[0]

    def fail(n: int) -> None:
        raise RuntimeError("the progress display broke")

    with pytest.raises(RuntimeError, match="the progress display broke"):
        load_hashed(path, progress=fail)


def test_a_hashing_process_that_gives_no_result_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Callable[..., Any], in_processes: None
) -> None:
    """A hashing process that dies (here: an interpreter that is not one, /bin/false) is an internal error
    naming the file, never a digest taken as given."""
    from auditor.audit.load import load_hashed
    from auditor.errors import EXIT_INTERNAL, AuditorError

    false = Path("/bin/false")
    if not false.exists():
        pytest.skip("no /bin/false")
    path = _sharded(tmp_path / "model", shards=1)[0]
    monkeypatch.setattr("sys.executable", str(false))
    with pytest.raises(AuditorError) as caught:
        load_hashed(path)
    assert caught.value.exit_code == EXIT_INTERNAL
    assert str(caught.value) == f"{path}: the process hashing it ended without a result (exit code 1)"
    code, _, stderr = run_cli("inspect", path)
    assert code == EXIT_INTERNAL
    assert stderr.splitlines() == [f"error: {path}: the process hashing it ended without a result (exit code 1)"]


def test_a_hash_started_early_is_taken_over_by_the_load(tmp_path: Path, in_processes: None) -> None:
    """``prehash`` (the command line, before its plugins load) starts the hash; the load of that file takes
    the running hash over: one read, hashlib's digest, and the progress told before anyone listened is
    passed on, so the bar still adds up to the file's size."""
    from auditor.audit import load

    path = _sharded(tmp_path / "model", shards=1)[0]
    single = tmp_path / "single.safetensors"
    path.rename(single)
    assert load.prehash(single)
    assert not load.prehash(tmp_path / "." / single.name)  # the same file: one hash
    told: list[int] = []
    model = load.load_hashed(single, progress=told.append)
    assert load._early == {}
    assert [(f["sha256"], f["size"]) for f in model.files] == [(_sha256(single), single.stat().st_size)]
    assert sum(told) == single.stat().st_size


def test_prehash_leaves_anything_but_a_regular_file_unopened(tmp_path: Path, in_processes: None) -> None:
    """A pipe named as the model is never opened (nothing blocks), a folder or a missing path starts nothing:
    the load finds them and says what they are."""
    import os

    from auditor.audit import load

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "folder").mkdir()
    for path in (fifo, tmp_path / "folder", tmp_path / "missing"):
        assert not load.prehash(path)
    assert load._early == {}
    with pytest.raises(InputError) as caught:
        load.load_hashed(fifo)
    assert str(caught.value) == f"{fifo}: is a named pipe (FIFO), not a regular file: auditor reads only regular files"


def test_a_hash_no_load_takes_over_is_stopped(tmp_path: Path, in_processes: None) -> None:
    from auditor.audit import load

    path = _sharded(tmp_path / "model", shards=1)[0]
    assert load.prehash(path)
    hasher = load._early[path.resolve()][0]
    load.stop_prehashing()
    assert load._early == {} and not hasher._children
    model = load.load_hashed(path)  # a later load hashes afresh
    assert model.files[0]["sha256"] == _sha256(path)
