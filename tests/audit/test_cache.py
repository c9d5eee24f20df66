"""The batch result cache: a re-run takes what is done, a run stopped with Ctrl-C resumes where it
stopped, every input that changes a result changes its key, and a file changed behind the cache's back
is read again."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from auditor.audit.cache import ResultCache, default_cache_path, file_stats, result_key


def findings_of(summary: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(r["name"], r["verdict"], r["exit_code"], r.get("evidence_sha256")) for r in summary["suspects"]]


def stored(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.OperationalError:  # the table is being created
        return 0


def test_a_run_stopped_with_ctrl_c_resumes_from_the_cache(
    suspect_folder: SimpleNamespace, reference_summary: dict[str, Any], run_cli: Callable[..., Any], tmp_path: Path
) -> None:
    db, out = tmp_path / "results.sqlite", tmp_path / "reports"
    args = ["audit", str(suspect_folder.folder), "--bundle", str(suspect_folder.bundle), "--out", str(out),
            "--cache", str(db), "-j", "1"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "auditor", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while stored(db) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    kept = stored(db)
    assert 5 <= kept < 20
    assert stderr == f"{kept} of 20 suspects done and kept in {db}; the same command audits the rest\n"

    code, stdout, _ = run_cli(*args)
    summary = json.loads((out / "summary.json").read_text())
    assert code == 5
    assert summary["run"]["from_cache"] == str(kept)  # what was done is not done again...
    assert stored(db) == 20
    assert findings_of(summary) == findings_of(reference_summary)  # ...and nothing is lost or twice
    assert sorted(line.split(":")[0] for line in stdout.splitlines() if line.startswith("/")) == [
        str(p) for p in suspect_folder.paths
    ]
    assert all((out / f"{p.name}.json").exists() for p in suspect_folder.paths if p.name.startswith(("w", "n")))


@pytest.fixture
def three(suspect_folder: SimpleNamespace, tmp_path: Path) -> list[str]:
    """Three of the suspects (watermarked, innocent, truncated) in a folder of their own, audited with -j 1."""
    folder = tmp_path / "three"
    folder.mkdir()
    for name in ("w0.safetensors", "n00.safetensors", "x_truncated.safetensors"):
        (folder / name).write_bytes((suspect_folder.folder / name).read_bytes())
    return ["audit", str(folder), "--bundle", str(suspect_folder.bundle), "--json", "-j", "1"]


def from_cache(run_cli: Callable[..., Any], *args: str) -> str:
    code, stdout, stderr = run_cli(*args)
    assert code == 4, stderr
    return str(json.loads(stdout)["run"]["from_cache"])


def test_options_refresh_and_no_cache_do_what_they_say(three: list[str], run_cli: Callable[..., Any]) -> None:
    assert from_cache(run_cli, *three) == "0"
    assert default_cache_path().exists()  # on by default, in the user's cache folder
    assert from_cache(run_cli, *three) == "3"  # the truncated file's error is the file's own: kept too
    assert from_cache(run_cli, *three, "-O", "greedy-residuals.p_threshold=0.001") == "0"  # another option
    assert from_cache(run_cli, *three, "--refresh") == "0"
    assert from_cache(run_cli, *three, "--no-cache") == "0"
    default_cache_path().unlink()
    assert from_cache(run_cli, *three, "--no-cache") == "0"
    assert not default_cache_path().exists()
    code, _, stderr = run_cli(*three, "--no-cache", "--refresh")
    assert (code, stderr.strip()) == (2, "error: --no-cache does not go with --cache or --refresh")


def test_a_file_rewritten_behind_the_cache_is_read_again(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"a" * 1000)
    with ResultCache(tmp_path / "c.sqlite") as cache:
        cache.put("k", path=model, sha256="1" * 64, result={"row": {}}, stats=file_stats(model))
        assert cache.known_sha256(model) == "1" * 64
        before = model.stat()
        time.sleep(0.01)
        model.write_bytes(b"b" * 1000)  # same size, and the old modification time put back
        os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert model.stat().st_mtime_ns == before.st_mtime_ns
        assert cache.known_sha256(model) is None  # its change time moved: read it again
        assert cache.get("k") == {"row": {}}
    with ResultCache(tmp_path / "c.sqlite", refresh=True) as cache:
        assert cache.get("k") is None


def test_every_input_of_a_result_is_in_its_key() -> None:
    base = {"suspect_sha256": "a" * 64, "command": "auditor audit s --bundle b",
            "inputs": {"bundles": ["b" * 64], "reference": None, "options": {}, "tool": {"version": "1"}}}  # fmt: skip
    keys = {result_key(**base)}
    for field, value in [("suspect_sha256", "c" * 64), ("command", "auditor audit s --bundle b2")]:
        keys.add(result_key(**{**base, field: value}))
    for name, value in [("bundles", ["d" * 64]), ("reference", ["e" * 64]), ("options", {"x": {"y": 1}}),
                        ("tool", {"version": "2"}), ("controls", [["f" * 64]])]:  # fmt: skip
        keys.add(result_key(**{**base, "inputs": {**base["inputs"], name: value}}))
    assert len(keys) == 8


def test_an_unusable_cache_file_is_one_line(three: list[str], run_cli: Callable[..., Any], tmp_path: Path) -> None:
    bad = tmp_path / "not.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    code, _, stderr = run_cli(*three, "--cache", str(bad))
    assert code == 2
    assert stderr.startswith(f"error: --cache {bad}: cannot use it as a result cache: ")
    assert len(stderr.splitlines()) == 1
