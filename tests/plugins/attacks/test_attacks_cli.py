"""``auditor attack`` and ``auditor evaluate`` on the command line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from safetensors.torch import load_file

from auditor.errors import EXIT_USAGE
from auditor.plugin_manager import registered


def test_attack_list(run_cli: Callable[..., Any]) -> None:
    code, out, _ = run_cli("attack", "--list", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["id"] for r in rows] == list(registered("attacks"))
    prune = next(r for r in rows if r["id"] == "prune-magnitude")
    assert {o["name"]: o["default"] for o in prune["options"]}["scope"] == "global"
    code, out, _ = run_cli("attack", "--list")
    assert code == 0 and "permute  [function-preserving]  Permute every layer's output channels" in out


def test_attack_writes_the_file_and_reports(
    gr_owner: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any]
) -> None:
    out_file = tmp_path / "pruned.safetensors"
    code, out, _ = run_cli("attack", "prune-magnitude", str(gr_owner.files["pt"]), "--out", str(out_file),
                           "--rate", "0.4", "-p", "scope=layer", "--json")  # fmt: skip
    summary = json.loads(out)
    assert code == 0 and summary["options"]["rate"] == 0.4 and summary["options"]["scope"] == "layer"
    assert float((load_file(out_file)["conv2.weight"] == 0).float().mean()) == pytest.approx(0.4, abs=1e-3)
    code, _, err = run_cli("attack", "prune-magnitude", str(gr_owner.files["pt"]), "--out", str(out_file))
    assert code == EXIT_USAGE and err == f"error: {out_file} already exists; choose another --out or --overwrite\n"
    code, _, err = run_cli("attack", "prune-magnitude", str(gr_owner.files["pt"]), "--out", str(out_file),
                           "-p", "rate")  # fmt: skip
    assert code == EXIT_USAGE and err == "error: --param takes KEY=VALUE, not 'rate'\n"


def test_attack_errors_are_one_line(tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    done = run_cli("attack", "no-such-attack", str(tmp_path / "m.pt"), "--out", str(tmp_path / "x.pt"))
    assert done.code == EXIT_USAGE
    known = ", ".join(sorted(registered("attacks")))  # every registered attack, in order
    assert done.stderr == f"error: unknown attack 'no-such-attack'; known: {known}\n"
    assert done.stderr.count("\n") == 1 and done.stdout == ""


def test_evaluate_command(gr_owner: SimpleNamespace, tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    code, out, _ = run_cli("evaluate", "--bundle", str(gr_owner.out / "owner_bundle.json"), "--model",
                           str(gr_owner.files["safetensors"]), "--reference", str(gr_owner.files["safetensors"]),
                           "--grid", "quick", "--attacks", "permute,bn-fold", "--out", str(tmp_path / "eval"),
                           "--no-progress", "--json")  # fmt: skip
    data = json.loads(out)
    assert code == 0
    assert "Greedy Residuals, after restore: detected through 2 of 2 function-preserving attacks." in data["summary"]
    assert Path(data["files"]["html"]).is_file()
