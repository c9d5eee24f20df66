"""The commands that do no model work start without torch: ``--help``, ``--version``, ``plugins`` and
``report verify`` each run in a fresh interpreter, and afterwards none of the heavy libraries is imported.

The entry point runs in a subprocess because the question is what a fresh process imports; this test
process has torch loaded long before. Only the built-in plugins load (``AUDITOR_LOAD_PLUGINS`` empty): a
third-party plugin may import what it likes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import auditor
from auditor.report.seal import seal

#: Libraries that cost a second or more to import together and that none of these commands needs.
HEAVY = ("torch", "numpy", "onnx", "onnxruntime", "safetensors", "scipy", "sklearn")

#: Runs the ``auditor`` entry point with the given arguments, then writes its exit code and every
#: imported module's name to the file named by the first argument.
RUN_ENTRY_POINT = """
import json, sys
result, args = sys.argv[1], sys.argv[2:]
sys.argv = ["auditor", *args]
from auditor.cli import main
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code
with open(result, "w") as fh:
    json.dump({"code": code, "modules": sorted(sys.modules)}, fh)
"""


def run_fresh(args: list[str], tmp_path: Path) -> tuple[int, str, set[str]]:
    """Exit code, standard output and the imported modules of ``auditor ARGS`` in a new interpreter."""
    result = tmp_path / "result.json"
    # The same auditor as this process's, whichever checkout or install that is.
    package_root = str(Path(auditor.__file__).resolve().parent.parent)
    env = {**os.environ, "AUDITOR_LOAD_PLUGINS": "", "PYTHONPATH": package_root}
    proc = subprocess.run(
        [sys.executable, "-c", RUN_ENTRY_POINT, str(result), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.exists(), proc.stderr
    data = json.loads(result.read_text())
    return data["code"], proc.stdout, set(data["modules"])


def sealed_report(tmp_path: Path) -> Path:
    """A small report sealed by the report code (content hash, no signature)."""
    document = {"report_format": "auditor-report/1", "suspect": {"sha256": "0" * 64}, "findings": []}
    path = tmp_path / "report.json"
    path.write_text(json.dumps({**document, "integrity": seal(document)}))
    return path


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], ["plugins"], ["plugins", "--json"], ["report", "verify", "REPORT"]],
    ids=["help", "version", "plugins", "plugins-json", "report-verify"],
)
def test_command_imports_no_heavy_library(args: list[str], tmp_path: Path) -> None:
    args = [str(sealed_report(tmp_path)) if a == "REPORT" else a for a in args]
    code, stdout, modules = run_fresh(args, tmp_path)
    assert code == 0, stdout
    assert stdout.strip()  # the command did its work: the check is not of a command that failed early
    if args[0] == "report":
        assert stdout.startswith("intact:"), stdout
    loaded = [name for name in HEAVY if name in modules]
    assert loaded == [], f"auditor {' '.join(args)} imported {', '.join(loaded)}"


def test_plugins_lists_every_built_in(tmp_path: Path) -> None:
    """The listing still comes from the real plugins (the torch-free start-up skips none of them)."""
    from auditor.plugin_manager import DEFAULT_PLUGINS

    code, stdout, _ = run_fresh(["plugins", "--json"], tmp_path)
    assert code == 0
    assert sorted(row["name"] for row in json.loads(stdout)) == sorted(DEFAULT_PLUGINS)
