"""The load stage's catch-all: an exception a loader did not raise on purpose still reaches the user as one
line and exit code 4, but marked as a loader bug (``LoaderBugError``, ``internal``) so that the fuzz tests
fail on it; a loader's own InputError passes through unmarked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from auditor import hookimpl
from auditor.audit.load import load_model
from auditor.bases import Format
from auditor.errors import EXIT_INPUT, InputError, LoaderBugError
from auditor.graph import LayerGraph


class BrokenFormat(Format):
    """Claims files that start with BROKEN and fails on them as the file's last byte says."""

    id = "broken-test"
    description = "a format whose loader fails"
    priority = 1000

    def sniff(self, path: Path, head: bytes) -> bool:
        return head.startswith(b"BROKEN")

    def load(self, path: Path) -> LayerGraph:
        if path.read_bytes().endswith(b"!"):
            raise InputError(path, "the loader refuses it on purpose")
        layers: dict[str, LayerGraph] = {}
        return layers["no such key"]  # a bug in the loader


class Plugin:
    @hookimpl
    def register_formats(self, register: Callable[[Format], None]) -> None:
        register(BrokenFormat())


def test_an_unanticipated_exception_is_a_loader_bug_with_exit_code_4(
    tmp_path: Path, plugin: Callable[..., Any], run_cli: Callable[..., Any]
) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"BROKEN model")
    with plugin(Plugin()):
        with pytest.raises(LoaderBugError) as caught:
            load_model(model)
        code, _, stderr = run_cli("inspect", model)
    assert caught.value.internal and caught.value.exit_code == EXIT_INPUT
    assert str(caught.value) == f"{model}: could not be read as broken-test: KeyError: 'no such key'"
    assert code == EXIT_INPUT
    assert stderr.splitlines() == [f"error: {model}: could not be read as broken-test: KeyError: 'no such key'"]


def test_a_deliberate_input_error_is_not_marked(tmp_path: Path, plugin: Callable[..., Any]) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"BROKEN model!")
    with plugin(Plugin()), pytest.raises(InputError) as caught:
        load_model(model)
    assert type(caught.value) is InputError and not caught.value.internal
    assert caught.value.problem == "the loader refuses it on purpose"


def test_a_file_with_thousands_of_loader_notes_gives_a_bounded_list(tmp_path: Path) -> None:
    """A loader notes each tensor it skips; 5,000 such tensors give MAX_NOTES notes, the last one counting the rest."""
    import json
    import struct

    from auditor.audit.load import MAX_NOTES, load_model

    header = {f"t{i}": {"dtype": "F8_E5M2_FNUZ_BOGUS", "shape": [1], "data_offsets": [i, i + 1]} for i in range(5000)}
    header["w"] = {"dtype": "F32", "shape": [1], "data_offsets": [5000, 5004]}
    raw = json.dumps(header).encode()
    path = tmp_path / "many.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(5004))
    graph = load_model(path)
    assert len(graph.notes) == MAX_NOTES
    assert sum("which auditor does not read; skipped" in n for n in graph.notes) == MAX_NOTES - 1
    left_out = int(graph.notes[-1].split()[2].replace(",", ""))
    assert graph.notes[-1].startswith("... and ") and left_out >= 5000 - (MAX_NOTES - 1)
