"""The command line: version, exit codes, one-line errors, JSON output, safe printing."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from safetensors.torch import save_file

import auditor
from auditor.cli import root as cli
from auditor.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_PLUGIN, PluginError


def test_version() -> None:
    # A fresh interpreter: the entry point itself (``python -m auditor``) is under test.
    result = subprocess.run([sys.executable, "-m", "auditor", "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout == f"auditor {auditor.__version__}\n"


def test_missing_file_is_one_line_exit_4(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    result = run_cli("inspect", str(tmp_path / "nope.pt"))
    assert result.code == EXIT_INPUT
    assert result.stderr == f"error: {tmp_path / 'nope.pt'}: no such file or folder\n"
    assert result.stdout == ""


def test_unknown_format_names_first_bytes(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(bytes(range(40, 100)))
    result = run_cli("inspect", str(path))
    assert result.code == EXIT_INPUT
    assert result.stderr.startswith(f"error: {path}: not a model format auditor recognises")
    assert "28 29 2a 2b" in result.stderr
    assert result.stderr.count("\n") == 1


def test_empty_file(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    path = tmp_path / "empty.safetensors"
    path.touch()
    result = run_cli("inspect", str(path))
    assert (result.code, result.stderr) == (EXIT_INPUT, f"error: {path}: the file is empty\n")


def test_bad_option_is_usage_error(run_cli: Callable[..., Any]) -> None:
    assert run_cli("inspect", "--no-such-option").code == 2


def test_inspect_json(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    model = tmp_path / "m.safetensors"
    save_file({"conv.weight": torch.randn(4, 3, 3, 3), "fc.weight": torch.randn(2, 4)}, str(model))
    result = run_cli("inspect", str(model), "--json")
    assert result.code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "safetensors"
    assert info["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert [(layer["name"], layer["kind"]) for layer in info["layers"]] == [("conv", "conv2d"), ("fc", "linear")]
    assert info["totals"]["parameters"] == 4 * 27 + 8
    assert info["edge_source"] == "inferred"


def test_hostile_names_cannot_drive_the_terminal(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    model = tmp_path / "m.safetensors"
    save_file({"\x1b[2J[bold]evil[/bold].weight": torch.randn(2, 2)}, str(model))
    result = run_cli("inspect", str(model))
    assert result.code == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert "\\x1b[2J[bold]evil[/bold]" in result.stdout


def test_unexpected_exception_is_one_line_exit_70(monkeypatch: pytest.MonkeyPatch, run_cli: Callable[..., Any]) -> None:
    app = typer.Typer()

    @app.command()
    def explode() -> None:
        """Fail like a bug would."""
        raise ValueError("unexpected")

    @app.command()
    def other() -> None:
        """Keep the app a group."""

    monkeypatch.setattr(cli, "app", app)
    code, _, err = run_cli("explode")
    assert code == EXIT_INTERNAL
    assert err.startswith("internal error: ValueError: unexpected (a bug in auditor")
    assert "Traceback" not in err


def test_plugin_error_at_startup_exits_6(monkeypatch: pytest.MonkeyPatch, run_cli: Callable[..., Any]) -> None:
    def broken() -> None:
        raise PluginError("plugin 'x' failed to load: ImportError: nope")

    monkeypatch.setattr(cli, "_add_plugin_commands", broken)
    code, _, err = run_cli("--version")
    assert code == EXIT_PLUGIN
    assert err == "error: plugin 'x' failed to load: ImportError: nope\n"
