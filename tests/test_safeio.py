"""The one atomic writer: whole files or none, the mode asked for, nothing left behind, never replacing
when told not to."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from auditor.safeio import sha256_file, write_atomically


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
