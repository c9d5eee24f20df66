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
