"""Every file a command reads is checked to be a regular file of bounded size before it is read: a named
pipe nobody writes, /dev/zero or a folder named where a file belongs is one line on stderr and exit 4, at
once (issue 14: ``report verify --html /dev/zero`` ran out of memory, ``--html PIPE`` waited for ever)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import auditor
from auditor import keys
from auditor.errors import EXIT_INPUT
from auditor.report.seal import seal

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PIPE = "is a named pipe (FIFO), not a regular file: auditor reads only regular files"
DEVICE = "is a character device, not a regular file: auditor reads only regular files"


@pytest.fixture
def files(tmp_path: Path) -> SimpleNamespace:
    """A sealed report, a model, and an Ed25519 key pair (private key unencrypted) to name beside the bad paths."""
    document = {"report_format": "auditor-evidence-report", "findings": [], "verdict": "inconclusive"}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({**document, "integrity": seal(document, html=b"<html></html>")}))
    pair = keys.generate_keypair(tmp_path / "keys", algorithm="ed25519")
    return SimpleNamespace(report=report, model=ASSETS / "st_cnn.safetensors", private=pair.private, out=tmp_path)


COMMANDS: dict[str, Callable[[SimpleNamespace, Path], list[Any]]] = {
    "report verify REPORT": lambda f, bad: ["report", "verify", bad],
    "report verify --html": lambda f, bad: ["report", "verify", f.report, "--html", bad],
    "report verify --public-key": lambda f, bad: ["report", "verify", f.report, "--public-key", bad],
    "keys show KEY": lambda f, bad: ["keys", "show", bad],
    "keys show --passphrase-file": lambda f, bad: ["keys", "show", f.private, "--passphrase-file", bad],
    "keys new --passphrase-file": lambda f, bad: ["keys", "new", "--out", f.out / "new", "--passphrase-file", bad],
    "inspect MODEL": lambda f, bad: ["inspect", bad],
    "audit SUSPECT": lambda f, bad: ["audit", bad],
    "audit --bundle": lambda f, bad: ["audit", f.model, "--bundle", bad],
    "audit --reference": lambda f, bad: ["audit", f.model, "--reference", bad],
    "audit --sign-key": lambda f, bad: ["audit", f.model, "--json-out", f.out / "r.json", "--sign-key", bad],
    "audit --passphrase-file": lambda f, bad: [
        *["audit", f.model, "--json-out", f.out / "r.json"],
        *["--sign-key", f.private, "--passphrase-file", bad],
    ],
}


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_a_pipe_or_a_device_is_refused_in_one_line(
    command: Callable[[SimpleNamespace, Path], list[Any]],
    files: SimpleNamespace,
    special_files: SimpleNamespace,
    run_cli: Callable[..., Any],
) -> None:
    for bad, problem in ((special_files.fifo, PIPE), (special_files.device, DEVICE)):
        if "--html" in command(files, bad) and bad == special_files.device:
            continue  # /dev/zero for --html runs in a child with a memory cap: see below
        code, stdout, stderr = run_cli(*command(files, bad))
        assert (code, stderr) == (EXIT_INPUT, f"error: {bad}: {problem}\n"), stdout
    assert not (files.out / "r.json").exists() and not (files.out / "new").exists()


def test_report_verify_html_from_dev_zero_is_refused_within_a_memory_cap(files: SimpleNamespace) -> None:
    """The first case of issue 14 as it was found: a fresh ``auditor`` process capped at 1 GiB of address
    space (the old code read /dev/zero until MemoryError: exit 70)."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    package_root = str(Path(auditor.__file__).resolve().parent.parent)
    env = {**os.environ, "AUDITOR_LOAD_PLUGINS": "", "PYTHONPATH": package_root}
    proc = subprocess.run(
        [sys.executable, "-m", "auditor", "report", "verify", str(files.report), "--html", "/dev/zero"],
        cwd=files.out, env=env, capture_output=True, text=True, timeout=60, preexec_fn=cap, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (EXIT_INPUT, "", f"error: /dev/zero: {DEVICE}\n")


def test_a_model_folder_or_external_data_that_names_a_pipe_is_refused(
    special_files: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(ASSETS / "st_cnn.safetensors", sharded / "a.safetensors")
    os.mkfifo(sharded / "b.safetensors")
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"conv1.weight": "a.safetensors", "fc.weight": "b.safetensors"}})
    )
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    shutil.copy(ASSETS / "onnx_external.onnx", onnx / "onnx_external.onnx")
    os.mkfifo(onnx / "onnx_external.bin")
    for model, pipe in (
        (sharded, sharded / "b.safetensors"),
        (onnx / "onnx_external.onnx", onnx / "onnx_external.bin"),
    ):
        code, _, stderr = run_cli("inspect", model)
        assert (code, stderr) == (EXIT_INPUT, f"error: {pipe}: {PIPE}\n")
