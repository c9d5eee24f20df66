"""The command line: version, exit codes, one-line errors, JSON output, safe printing."""

from __future__ import annotations

import hashlib
import json
import signal
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from safetensors.torch import save_file

import auditor
from auditor.cli import root as cli
from auditor.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_PLUGIN, PluginError

ASSETS = Path(__file__).resolve().parents[1] / "assets"


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


# --------------------------------------------------------------------------- large and hostile tables


def _write_tensor_table(path: Path, names: list[str]) -> None:
    """A safetensors file of one-element float32 tensors named ``names``, written without the library
    (which takes far longer than the header itself for 200,000 tensors)."""
    header = {name: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, name in enumerate(names)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 * len(names)))


@contextmanager
def _hang_guard(seconds: int) -> Iterator[None]:
    """Fail instead of hanging the suite: a guard against a table that costs a millisecond a row
    (200,000 rows: minutes), not a speed target (that is benchmarks/bench_inspect_rows.py)."""

    def stop(signum: int, frame: Any) -> None:
        pytest.fail(f"inspect still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.slow
def test_inspect_of_200000_tensors_shows_every_layer(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    n = 200_000
    names = [f"blocks.{i}" for i in range(n)]
    model = tmp_path / "many.safetensors"
    _write_tensor_table(model, [f"{name}.weight" for name in names])
    with _hang_guard(60):
        table = run_cli("inspect", model)
    with _hang_guard(60):
        as_json = run_cli("inspect", model, "--json")
    assert (table.code, table.stderr) == (0, "")
    lines = table.stdout.splitlines()
    first = lines.index("     #  layer          kind        shape  dtype    parameters")
    rows = lines[first + 1 : first + 1 + n]
    assert [row.split()[:2] for row in rows] == [[str(i), name] for i, name in enumerate(names)]
    assert lines[first + 1 + n] == "edges (inferred):"
    assert sum(line.startswith("  blocks.") and " -> blocks." in line for line in lines) == n - 1
    assert lines[-1] == f"totals: {n} layers, {n:,d} parameters, {4 * n:,d} bytes, {n - 1} edges"
    assert (as_json.code, as_json.stderr) == (0, "")
    info = json.loads(as_json.stdout)
    assert [layer["name"] for layer in info["layers"]] == names
    assert len(info["edges"]) == n - 1
    assert info["totals"] == {"layers": n, "parameters": n, "bytes": 4 * n, "edges": n - 1}
    # One line per layer, so that the output can be searched a layer at a time.
    assert sum(line.startswith('    {"name": "blocks.') for line in as_json.stdout.splitlines()) == n


def test_inspect_table_is_aligned_whatever_one_name_holds(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    model = tmp_path / "m.safetensors"
    long = "x" * 5000
    save_file({"a.weight": torch.ones(3, 2), f"{long}.weight": torch.ones(2), "b\x1b[1m.weight": torch.ones(4)},
              str(model))  # fmt: skip
    result = run_cli("inspect", model)
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    layer = 64  # the layer column's width: the longest name up to 64 characters
    header = lines.index("#  " + "layer".ljust(layer) + "  kind        shape  dtype    parameters")
    assert lines[header + 1 : header + 4] == [
        "0  " + "a".ljust(layer) + "  linear      3x2    float32           6",
        "1  " + "b\\x1b[1m".ljust(layer) + "  layer-norm  4      float32           4",
        f"2  {long}  layer-norm  2      float32           2",
    ]  # the 5,000-character name keeps its row; no other row is padded to its width


def test_inspect_json_is_the_description_one_entry_a_line(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    model = tmp_path / "m.safetensors"
    save_file({"conv.weight": torch.randn(4, 3, 3, 3), "fc.weight": torch.randn(2, 4), "fc.bias": torch.randn(2)},
              str(model), metadata={"format": "pt"})  # fmt: skip
    result = run_cli("inspect", model, "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(json.dumps(cli.inspect_model(path=model)))
    lines = result.stdout.splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    layers = lines.index('  "layers": [')
    assert [line[:13] for line in lines[layers + 1 : layers + 4]] == ['    {"name": '] * 2 + ["  ],"]
    assert '  "metadata": {' in lines and '    "format": "pt"' in lines


def test_json_lines_handles_empty_lists_and_iterators() -> None:
    data = {"a": [], "b": iter([{"x": 1}, {"y": [2]}]), "c": {"d": None}, "e": iter(())}
    text = "\n".join(cli.json_lines(data))
    assert json.loads(text) == {"a": [], "b": [{"x": 1}, {"y": [2]}], "c": {"d": None}, "e": []}
    assert text.splitlines() == [
        "{", '  "a": [],', '  "b": [', '    {"x": 1},', '    {"y": [2]}', "  ],", '  "c": {', '    "d": null', "  },",
        '  "e": []', "}",
    ]  # fmt: skip


# --------------------------------------------------------------------------- TorchScript code


def _scripted_note() -> str:
    with zipfile.ZipFile(ASSETS / "pt_scripted.pt") as zf:
        code = [(i.filename.partition("/")[2], i.file_size) for i in zf.infolist() if "/code/" in i.filename]
    listed = ", ".join(f"{name!r} ({size:,d} B)" for name, size in code)
    return (
        f"TorchScript: the archive carries {len(code)} code entries of {sum(s for _, s in code):,d} bytes ({listed})"
        " and constants.pkl (4 B), which auditor did not read or run; torch.jit.load would compile and run that"
        " code and unpickle constants.pkl when loading the model, and so would torch.load with weights_only=False,"
        " which hands an archive holding constants.pkl to torch.jit.load"
    )


def test_inspect_says_a_torchscript_file_carries_code(run_cli: Callable[..., Any]) -> None:
    note = _scripted_note()
    table = run_cli("inspect", ASSETS / "pt_scripted.pt")
    assert table.code == 0, table.stderr
    assert f"note: {note}" in table.stdout.splitlines()
    as_json = run_cli("inspect", ASSETS / "pt_scripted.pt", "--json")
    assert note in json.loads(as_json.stdout)["notes"]
    clean = run_cli("inspect", ASSETS / "pt_clean.pt")
    assert clean.code == 0 and "TorchScript" not in clean.stdout


def test_report_says_a_torchscript_file_carries_code(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    from markupsafe import escape

    note = _scripted_note()
    html = tmp_path / "report.html"
    result = run_cli("audit", ASSETS / "pt_scripted.pt", "--out", html)
    assert result.code == 3, result.stderr  # inconclusive: no bundle given
    report = json.loads(html.with_suffix(".json").read_text())
    assert note in report["suspect"]["loader_notes"]
    assert f"<li>{escape(note)}</li>" in html.read_text()


@pytest.mark.parametrize(
    ("words", "started"),
    [
        (["inspect", "{m}", "--json"], ["m"]),
        (["-q", "audit", "--bundle", "{b}", "{m}", "--json"], ["m"]),
        (["audit", "--reference", "{b}", "--p-threshold", "0.1", "{m}"], ["m"]),  # an alias: taken to have a value
        (["audit", "--json-out={b}", "--", "{m}"], ["m"]),
        (["audit", "{m}", "{b}"], []),  # a batch: each suspect is hashed where it is audited
        (["plugins", "{m}"], []),
    ],
)
def test_the_command_line_starts_hashing_the_one_model_it_names_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, words: list[str], started: list[str]
) -> None:
    """Before the plugins load and the options are parsed, the one argument that is neither an option nor an
    option's value starts hashing (the load takes it over); an option's value or a batch starts nothing."""
    from auditor.audit import load

    monkeypatch.setattr("auditor.audit.load.IN_PROCESS_FROM", 0)
    files = {"m": tmp_path / "model.bin", "b": tmp_path / "bundle.json"}
    for path in files.values():
        path.write_bytes(b"x" * 100)
    try:
        cli._prehash([w.format(**files) for w in words])
        assert sorted(load._early) == [files[n].resolve() for n in started]
    finally:
        load.stop_prehashing()


def test_a_hash_the_command_line_started_is_the_one_reported_or_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_cli: Callable[..., Any]
) -> None:
    from auditor.audit import load

    monkeypatch.setattr("auditor.audit.load.IN_PROCESS_FROM", 0)  # hashed by a process from the first byte
    model = tmp_path / "m.safetensors"
    save_file({"fc.weight": torch.randn(2, 4)}, str(model))
    result = run_cli("inspect", str(model), "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert load._early == {}
    assert run_cli("audit", str(model), "--no-such-option").code == 2  # started, never taken over: stopped
    assert load._early == {}
