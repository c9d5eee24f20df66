"""The one atomic writer: whole files or none, the mode asked for, nothing left behind, never replacing
when told not to; and the one careful reader: only regular files, never a pipe or a device, within a limit."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from auditor import safeio
from auditor.errors import InputError
from auditor.safeio import check_path, open_regular, read_small_file, sha256_file, write_atomically


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_bytes_replace_the_file_in_one_step_with_the_mode_asked_for(tmp_path: Path) -> None:
    target = tmp_path / "bundle.json"
    target.write_bytes(b"old")
    write_atomically(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new" and _mode(target) == 0o600
    assert os.listdir(tmp_path) == ["bundle.json"]
    assert sha256_file(target) == hashlib.sha256(b"new").hexdigest()


def test_a_writer_function_gets_a_temporary_path_and_its_file_keeps_the_usual_mode(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    seen: list[Path] = []

    def write(path: Path) -> None:  # as safetensors does: a fresh file of its own, mode 0600
        seen.append(path)
        path.unlink()
        path.write_bytes(b"weights")
        path.chmod(0o600)

    umask = os.umask(0o022)
    try:
        write_atomically(target, write)
    finally:
        os.umask(umask)
    assert seen[0] != target and seen[0].parent == tmp_path
    assert target.read_bytes() == b"weights" and _mode(target) == 0o644


def test_a_failed_write_leaves_the_old_file_and_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_bytes(b"old")

    def fail(path: Path) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_atomically(target, fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["report.json"]


def test_exclusive_never_replaces_a_file_or_follows_a_link(tmp_path: Path) -> None:
    key = tmp_path / "owner.key"
    write_atomically(key, b"secret", mode=0o600, exclusive=True)
    assert key.read_bytes() == b"secret" and _mode(key) == 0o600
    with pytest.raises(FileExistsError):
        write_atomically(key, b"other", exclusive=True)
    assert key.read_bytes() == b"secret"
    planted = tmp_path / "planted.key"
    planted.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        write_atomically(planted, b"secret", exclusive=True)
    assert not (tmp_path / "elsewhere").exists()


def _refusal(read: Callable[[], object]) -> str:
    with pytest.raises(InputError) as info:
        read()
    return info.value.problem


def test_pipes_devices_and_folders_are_refused_unopened(special_files: SimpleNamespace) -> None:
    pipe = "is a named pipe (FIFO), not a regular file: auditor reads only regular files"
    device = "is a character device, not a regular file: auditor reads only regular files"
    readers: list[Callable[[Path], object]] = [
        lambda p: read_small_file(p, limit=1 << 20, what="a report"),
        lambda p: sha256_file(p, what="a report"),  # was: waited for a writer on the pipe, hashed /dev/zero for ever
        lambda p: open_regular(p, what="a report"),
        lambda p: check_path(p, what="a report"),
    ]
    for read in readers:
        assert _refusal(lambda: read(special_files.fifo)) == pipe
        assert _refusal(lambda: read(special_files.device)) == device
        assert _refusal(lambda: read(special_files.folder)) == "is a folder, not a report"
        assert _refusal(lambda: read(special_files.folder / "nope")) == "no such file"
    assert check_path(special_files.folder, what="a model", folder_ok=True).st_size >= 0
    assert _refusal(lambda: check_path(special_files.fifo, what="a model", folder_ok=True)) == pipe


def test_a_path_swapped_for_a_pipe_after_its_stat_is_refused_on_the_open_descriptor(
    special_files: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    regular = tmp_path / "regular"
    regular.write_bytes(b"x")
    # The stat saw a regular file; by the open the path names a pipe: the open must not wait for a writer.
    monkeypatch.setattr(safeio, "check_path", lambda path, **_: regular.stat())
    assert _refusal(lambda: open_regular(special_files.fifo, what="a report")).startswith("is a named pipe (FIFO)")


def test_limits_are_checked_before_and_while_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "page.html"
    path.write_bytes(b"<p>" * 1000)
    too_large = "the file is too large for a page (the limit is 2,999 bytes)"
    assert read_small_file(path, limit=3000, what="a page") == b"<p>" * 1000
    assert sha256_file(path, limit=3000, what="a page") == hashlib.sha256(b"<p>" * 1000).hexdigest()
    assert _refusal(lambda: read_small_file(path, limit=2999, what="a page")) == too_large
    assert _refusal(lambda: sha256_file(path, limit=2999, what="a page")) == too_large
    # A file that grows after its stat is cut off by the read itself.
    small = tmp_path / "small"
    small.write_bytes(b"x")
    monkeypatch.setattr(safeio, "check_path", lambda p, **_: small.stat())
    assert _refusal(lambda: read_small_file(path, limit=2999, what="a page")) == too_large
    assert _refusal(lambda: sha256_file(path, limit=2999, what="a page")) == too_large
