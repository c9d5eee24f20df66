"""The command line: version, exit codes, one-line errors, JSON output, safe printing."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import save_file

import auditor
from auditor.cli import root as cli
from auditor.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_PLUGIN, PluginError


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditor", *args], capture_output=True, text=True)


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout == f"auditor {auditor.__version__}\n"


def test_missing_file_is_one_line_exit_4(tmp_path: Path) -> None:
    result = run("inspect", str(tmp_path / "nope.pt"))
    assert result.returncode == EXIT_INPUT
    assert result.stderr == f"error: {tmp_path / 'nope.pt'}: no such file or folder\n"
    assert result.stdout == ""


def test_unknown_format_names_first_bytes(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(bytes(range(40, 100)))
    result = run("inspect", str(path))
    assert result.returncode == EXIT_INPUT
    assert result.stderr.startswith(f"error: {path}: not a model format auditor recognises")
    assert "28 29 2a 2b" in result.stderr
    assert result.stderr.count("\n") == 1


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.touch()
    result = run("inspect", str(path))
    assert (result.returncode, result.stderr) == (EXIT_INPUT, f"error: {path}: the file is empty\n")


def test_bad_option_is_usage_error() -> None:
    assert run("inspect", "--no-such-option").returncode == 2


def test_inspect_json(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    save_file({"conv.weight": torch.randn(4, 3, 3, 3), "fc.weight": torch.randn(2, 4)}, str(model))
    result = run("inspect", str(model), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "safetensors"
    assert info["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert [(layer["name"], layer["kind"]) for layer in info["layers"]] == [("conv", "conv2d"), ("fc", "linear")]
    assert info["totals"]["parameters"] == 4 * 27 + 8
    assert info["edge_source"] == "inferred"


def test_hostile_names_cannot_drive_the_terminal(tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    save_file({"\x1b[2J[bold]evil[/bold].weight": torch.randn(2, 2)}, str(model))
    result = run("inspect", str(model))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert "\\x1b[2J[bold]evil[/bold]" in result.stdout


def test_unexpected_exception_is_one_line_exit_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    app = typer.Typer()

    @app.command()
    def explode() -> None:
        """Fail like a bug would."""
        raise ValueError("unexpected")

    @app.command()
    def other() -> None:
        """Keep the app a group."""

    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr(cli, "_plugins_added", True)
    with pytest.raises(SystemExit) as exc:
        cli.main(["explode"])
    assert exc.value.code == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("internal error: ValueError: unexpected (a bug in auditor")
    assert "Traceback" not in err


def test_plugin_error_at_startup_exits_6(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> None:
        raise PluginError("plugin 'x' failed to load: ImportError: nope")

    monkeypatch.setattr(cli, "_plugins_added", False)
    monkeypatch.setattr(cli, "_add_plugin_commands", broken)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == EXIT_PLUGIN
    assert capsys.readouterr().err == "error: plugin 'x' failed to load: ImportError: nope\n"
