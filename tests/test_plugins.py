"""One test per hook (named test_hook_<hook>), plus the plugin manager's guarantees.

Throwaway plugins are inline classes, registered for one test and always
unregistered.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import typer

from auditor import (
    Attack,
    Detector,
    Embedder,
    Finding,
    Format,
    Layer,
    LayerGraph,
    LayerKind,
    Restorer,
    TensorRef,
    Verdict,
    hookimpl,
)
from auditor.audit.detect import run_detectors
from auditor.audit.load import load_model
from auditor.errors import PluginError
from auditor.plugin_manager import DEFAULT_PLUGINS, get_plugin_manager, registered, reset_plugin_manager
from auditor.report.html import jinja_environment


def toy_graph(path: Path) -> LayerGraph:
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    layer = Layer("fc", LayerKind.LINEAR, {"weight": TensorRef.from_tensor("fc.weight", weight)})
    return LayerGraph(format="toy", path=path, layers=[layer], files=[path])


class ToyFormat(Format):
    id = "toy"
    description = "toy test format"
    priority = 100

    def sniff(self, path: Path, head: bytes) -> bool:
        return head.startswith(b"TOYMODEL")

    def load(self, path: Path) -> LayerGraph:
        return toy_graph(path)


class CountingDetector(Detector):
    id = "counting"
    description = "counts layers"

    def detect(self, suspect: LayerGraph, *, bundle: Any | None, context: Mapping[str, Any]) -> list[Finding]:
        return [Finding(self.id, Verdict.NOT_DETECTED, f"{len(suspect)} layers", metrics={"layers": len(suspect)})]


class CrashingDetector(Detector):
    id = "crashing"
    description = "always fails"

    def detect(self, suspect: LayerGraph, *, bundle: Any | None, context: Mapping[str, Any]) -> list[Finding]:
        raise RuntimeError("boom")


class SchemeDetector(Detector):
    id = "toy-scheme"
    description = "reads toy bundles"
    scheme = "toy-scheme"

    def detect(self, suspect: LayerGraph, *, bundle: Any | None, context: Mapping[str, Any]) -> list[Finding]:
        assert bundle is not None
        return [Finding(self.id, Verdict.DETECTED, "found", scheme=self.scheme, subject=bundle["owner"])]


def test_hook_register_formats(tmp_path: Path, plugin: Callable[..., Any]) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"TOYMODEL and then anything")

    class Plugin:
        @hookimpl
        def register_formats(self, register):  # type: ignore[no-untyped-def]
            register(ToyFormat())

    with plugin(Plugin()):
        assert "toy" in registered("formats")
        assert registered("formats")["toy"].plugin == "test-plugin"
        graph = load_model(model)
        assert graph.format == "toy"
        assert graph.layer("fc").weight is not None
    assert "toy" not in registered("formats")


def test_hook_register_detectors(plugin: Callable[..., Any]) -> None:
    class Plugin:
        @hookimpl
        def register_detectors(self, register):  # type: ignore[no-untyped-def]
            register(CountingDetector())
            register(SchemeDetector())

    graph = toy_graph(Path("x"))
    with plugin(Plugin()):
        findings = run_detectors(graph, bundles=[{"scheme": "toy-scheme", "owner": "alice"}])
    by_detector = {f.detector: f for f in findings}
    assert by_detector["counting"].metrics == {"layers": 1}
    assert by_detector["toy-scheme"].subject == "alice"
    assert by_detector["toy-scheme"].verdict is Verdict.DETECTED


def test_crashing_detector_becomes_error_finding_and_others_run(plugin: Callable[..., Any]) -> None:
    class Plugin:
        @hookimpl
        def register_detectors(self, register):  # type: ignore[no-untyped-def]
            register(CrashingDetector())
            register(CountingDetector())

    with plugin(Plugin()):
        findings = run_detectors(toy_graph(Path("x")))
    by_detector = {f.detector: f for f in findings}
    assert by_detector["crashing"].verdict is Verdict.ERROR
    assert "RuntimeError: boom" in by_detector["crashing"].summary
    assert by_detector["counting"].verdict is Verdict.NOT_DETECTED


def test_bundle_without_detector_is_inconclusive() -> None:
    findings = run_detectors(toy_graph(Path("x")), bundles=[{"scheme": "nobody-reads-this"}], detectors=[])
    assert [f.verdict for f in findings] == [Verdict.INCONCLUSIVE]
    assert "nobody-reads-this" in findings[0].summary


def test_findings_do_not_depend_on_registration_order(plugin: Callable[..., Any]) -> None:
    class A:
        @hookimpl
        def register_detectors(self, register):  # type: ignore[no-untyped-def]
            register(CountingDetector())

    class B:
        @hookimpl
        def register_detectors(self, register):  # type: ignore[no-untyped-def]
            register(CrashingDetector())

    graph = toy_graph(Path("x"))
    with plugin(A(), "a"), plugin(B(), "b"):
        first = [f.to_dict() for f in run_detectors(graph)]
    with plugin(B(), "b"), plugin(A(), "a"):
        second = [f.to_dict() for f in run_detectors(graph)]
    assert first == second
    assert [f["detector"] for f in first] == ["counting", "crashing"]


class ToyRestorer(Restorer):
    id = "toy-restorer"
    description = "returns the suspect unchanged"

    def restore(self, suspect: LayerGraph, reference: LayerGraph) -> tuple[LayerGraph, dict[str, Any]]:
        return suspect, {"moved": 0}


class ToyEmbedder(Embedder):
    id = "toy-embedder"
    description = "writes a marker file"

    def embed(self, *, out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
        (out_dir / "marker").write_text(str(options["message"]))
        return {"written": ["marker"]}


class ToyAttack(Attack):
    id = "toy-attack"
    description = "copies the file"
    function_preserving = True

    def apply(self, model: Path, out: Path, *, options: Mapping[str, Any]) -> dict[str, Any]:
        out.write_bytes(model.read_bytes())
        return {"copied": True}


def test_hook_register_restorers(plugin: Callable[..., Any]) -> None:
    class Plugin:
        @hookimpl
        def register_restorers(self, register):  # type: ignore[no-untyped-def]
            register(ToyRestorer())

    with plugin(Plugin()):
        restorer = registered("restorers")["toy-restorer"].component
        assert isinstance(restorer, Restorer)
        graph = toy_graph(Path("x"))
        restored, log = restorer.restore(graph, graph)
    assert restored is graph and log == {"moved": 0}


def test_hook_register_embedders(tmp_path: Path, plugin: Callable[..., Any]) -> None:
    class Plugin:
        @hookimpl
        def register_embedders(self, register):  # type: ignore[no-untyped-def]
            register(ToyEmbedder())

    with plugin(Plugin()):
        embedder = registered("embedders")["toy-embedder"].component
        assert isinstance(embedder, Embedder)
        embedder.embed(out_dir=tmp_path, options={"message": "(c) owner"})
    assert (tmp_path / "marker").read_text() == "(c) owner"


def test_hook_register_attacks(tmp_path: Path, plugin: Callable[..., Any]) -> None:
    class Plugin:
        @hookimpl
        def register_attacks(self, register):  # type: ignore[no-untyped-def]
            register(ToyAttack())

    src = tmp_path / "in.bin"
    src.write_bytes(b"weights")
    with plugin(Plugin()):
        attack = registered("attacks")["toy-attack"].component
        assert isinstance(attack, Attack)
        attack.apply(src, tmp_path / "out.bin", options={})
    assert (tmp_path / "out.bin").read_bytes() == b"weights"


def test_register_refuses_wrong_type_and_duplicate_ids(plugin: Callable[..., Any]) -> None:
    class WrongType:
        @hookimpl
        def register_detectors(self, register):  # type: ignore[no-untyped-def]
            register(ToyAttack())

    with plugin(WrongType()), pytest.raises(PluginError, match="which takes auditor.bases.Detector instances"):
        registered("detectors")

    class Duplicate:
        @hookimpl
        def register_formats(self, register):  # type: ignore[no-untyped-def]
            register(ToyFormat())

    with plugin(Duplicate(), "one"), plugin(Duplicate(), "two"):
        with pytest.raises(PluginError, match="registered format 'toy', which plugin 'one' already registered"):
            registered("formats")


def test_hook_register_commands(plugin: Callable[..., Any], run_cli: Callable[..., Any]) -> None:
    class Plugin:
        @hookimpl
        def register_commands(self, app: typer.Typer) -> None:
            @app.command(name="hello-test")
            def hello(name: str) -> None:
                """Say hello."""
                typer.echo(f"hello {name}")

    from auditor.cli import root as cli

    app = typer.Typer()

    @app.command()
    def inspect() -> None:
        """Stand-in for the built-in."""

    with plugin(Plugin()):
        get_plugin_manager().hook.register_commands(app=app)
        result = run_cli("hello-test", "court")  # the same plugin, through the real app
    assert result.code == 0, result.stderr
    assert result.stdout + result.stderr == "hello court\n"
    assert "hello-test" in cli._command_names(app)


@pytest.mark.parametrize("clash", ["inspect", "keys"])
def test_plugin_command_clashing_with_builtin_is_refused(
    monkeypatch: pytest.MonkeyPatch, clash: str, plugin: Callable[..., Any]
) -> None:
    from auditor.cli import root as cli

    class Plugin:
        @hookimpl
        def register_commands(self, app: typer.Typer) -> None:
            @app.command(name="harmless")
            def harmless() -> None:
                """Added before the clash: must be taken out too."""

            if clash == "keys":
                app.add_typer(typer.Typer(), name="keys")
            else:

                @app.command(name="inspect")
                def hijack() -> None:
                    """Pretend to be inspect."""

    app = typer.Typer()

    @app.command()
    def inspect() -> None:
        """Stand-in for the built-in."""

    app.add_typer(typer.Typer(), name="keys")  # built-in groups come before plugin commands too
    monkeypatch.setattr(cli, "app", app)
    with (
        plugin(Plugin(), "zz-test-plugin"),
        pytest.raises(PluginError, match=f"plugin 'zz-test-plugin' adds command '{clash}', which already exists"),
    ):
        cli._add_plugin_commands()
    names = cli._command_names(app)
    # Everything the clashing plugin added is taken out; the built-ins (and earlier plugins) stay.
    assert names.count("inspect") == 1 and names.count("keys") == 1
    assert "harmless" not in names


def test_hook_prepare_jinja2_environment(plugin: Callable[..., Any]) -> None:
    class Plugin:
        @hookimpl
        def prepare_jinja2_environment(self, env):  # type: ignore[no-untyped-def]
            env.filters["shout"] = lambda s: s.upper() + "!"

    with plugin(Plugin()):
        env = jinja_environment()
        assert env.from_string("{{ v | shout }}").render(v="<b>x") == "&lt;B&gt;X!"
    assert "shout" not in jinja_environment().filters


def test_misspelled_hook_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("auditor_test_typo_plugin")

    @hookimpl
    def register_detector(register):  # type: ignore[no-untyped-def]  # missing "s"
        pass

    module.register_detector = register_detector  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr("auditor.plugin_manager.DEFAULT_PLUGINS", (*DEFAULT_PLUGINS, module.__name__))
    reset_plugin_manager()
    with pytest.raises(PluginError, match="unknown hook.*register_detector"):
        get_plugin_manager()


def test_builtins_register_through_the_same_hooks() -> None:
    formats = registered("formats")
    for fmt_id in ("pytorch", "onnx", "safetensors"):
        assert formats[fmt_id].plugin.startswith("auditor.formats."), fmt_id
