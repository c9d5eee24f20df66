"""How a batch is named on the command line: folders, list files (``@FILE``), glob patterns; and the one-line
errors of the batch options."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """Four small model files in nested folders, and a text file that is not a model."""
    for name in ("a/m1.safetensors", "a/m2.safetensors", "b/deep/m3.safetensors", "b/m4.pt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ASSETS / ("pt_clean.pt" if name.endswith(".pt") else "st_cnn.safetensors"), tmp_path / name)
    (tmp_path / "a" / "notes.txt").write_text("not a model")
    return tmp_path


def audited(run_cli: Callable[..., Any], *args: Any) -> list[str]:
    code, stdout, stderr = run_cli("audit", *args, "--json", "-j", "1", "--no-cache")
    assert code == 3, stderr  # no bundle: inconclusive
    return [row["path"] for row in json.loads(stdout)["suspects"]]


def test_a_list_file_names_the_suspects(models: Path, run_cli: Callable[..., Any]) -> None:
    listing = models / "list.txt"
    listing.write_text(f"# suspects\n{models / 'b/m4.pt'}\n\n  {models / 'a/m1.safetensors'}  \n")
    assert audited(run_cli, f"@{listing}") == [str(models / "b/m4.pt"), str(models / "a/m1.safetensors")]


def test_a_glob_pattern_names_the_files_it_matches(models: Path, run_cli: Callable[..., Any]) -> None:
    assert audited(run_cli, f"{models}/**/*.safetensors") == [
        str(models / p) for p in ("a/m1.safetensors", "a/m2.safetensors", "b/deep/m3.safetensors")
    ]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["PATTERN"], 2, "error: {models}/*.gguf: the pattern matches no file"),
        (["@BINARY"], 4, "error: {models}/bin.txt: a list of suspects must be UTF-8 text (bad byte at offset 1)"),
        (["@EMPTY"], 2, "error: the suspects named hold no path"),
        (["@MISSING"], 4, "error: {models}/missing.txt: no such file"),
        (["FOLDER", "--engine", "spark"], 2, "error: --engine 'spark': choose one of local, ray"),
        (["FOLDER", "-j", "1", "--ray-address", "auto"], 2, "error: --ray-address goes with --engine ray"),
        (["FOLDER", "--engine", "ray", "--ray-address", "127.0.0.1:1"], 2,
         "error: --ray-address 127.0.0.1:1: cannot reach a Ray cluster: Connection refused"),
        (["FOLDER", "--engine", "ray", "--ray-address", "nowhere"], 2,
         "error: --ray-address nowhere: write it as auto, HOST:PORT or ray://HOST:PORT"),
    ],
)
def test_batch_naming_errors_are_one_line(
    models: Path, run_cli: Callable[..., Any], args: list[str], code: int, message: str
) -> None:
    (models / "bin.txt").write_bytes(b"a\xff\n")
    (models / "empty.txt").write_text("# nothing\n\n")
    given = {"PATTERN": f"{models}/*.gguf", "@BINARY": f"@{models}/bin.txt", "@EMPTY": f"@{models}/empty.txt",
             "@MISSING": f"@{models}/missing.txt", "FOLDER": str(models / "a")}  # fmt: skip
    result = run_cli("audit", *[given.get(a, a) for a in args])
    assert (result.code, result.stderr) == (code, message.format(models=models) + "\n")
