"""The package's import graph keeps its shape: no cycles, plugins self-contained, the core and toolkit below them.

Every module's imports are read with :mod:`ast` (imports inside functions and
``TYPE_CHECKING`` blocks included: they are dependencies all the same). ``from
auditor.x import y`` imports ``auditor.x.y`` when that is a module, else
``auditor.x``; a package's ``__init__`` running first is not counted.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "auditor"

#: Modules every plugin may import besides the toolkit and itself (the core); ``auditor.cli.console`` is
#: the one public part of the command line.
CORE_PACKAGES = ("auditor.audit", "auditor.report", "auditor.formats")
PUBLIC_CLI = "auditor.cli.console"
#: Top-level names that are not the core: the command line (but its console), the toolkit, the plugins.
NOT_CORE = ("auditor.__main__", "auditor.cli", "auditor.plugins", "auditor.toolkit")


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: Iterable[str]) -> Iterator[str]:
    names = set(known)

    def nearest(dotted: str) -> str | None:
        while dotted and dotted not in names:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    if isinstance(node, ast.Import):
        for alias in node.names:
            if (found := nearest(alias.name)) is not None:
                yield found
        return
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    for alias in node.names:
        found = f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else nearest(base)
        if found is not None:
            yield found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source."""
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = {
            target
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for target in _imported(module, path.name == "__init__.py", node, files)
        }
        graph[module] = targets - {module}
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def is_core(module: str) -> bool:
    """The core: the package's top-level modules, audit/, report/, formats/ and the public console."""
    if module == PUBLIC_CLI or any(_within(module, p) for p in CORE_PACKAGES):
        return True
    return module.count(".") <= 1 and module not in NOT_CORE


def plugin_of(module: str) -> str | None:
    """``auditor.plugins.<name>`` for a module inside a built-in plugin."""
    parts = module.split(".")
    return ".".join(parts[:3]) if len(parts) >= 3 and parts[:2] == ["auditor", "plugins"] else None


def test_the_graph_reader_resolves_every_import_form(tmp_path: Path) -> None:
    pkg = tmp_path / "auditor"
    (pkg / "plugins" / "a").mkdir(parents=True)
    for name in ("__init__.py", "core.py", "plugins/__init__.py", "plugins/a/__init__.py", "plugins/a/x.py"):
        (pkg / name).write_text("")
    (pkg / "plugins" / "a" / "y.py").write_text(
        "from . import x\nfrom .x import thing\nfrom .. import a\n"
        "def late():\n    import auditor.core\n    from auditor import core, hookimpl\n"
    )
    graph = import_graph(pkg)
    assert graph["auditor.plugins.a.y"] == {"auditor.plugins.a.x", "auditor.plugins.a", "auditor.core", "auditor"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    found = cycles(graph)
    assert not found, "\n".join(" <-> ".join(c) for c in found)


def test_a_plugin_imports_only_the_core_the_toolkit_and_itself(graph: dict[str, set[str]]) -> None:
    stray = {
        f"{module} -> {target}"
        for module, targets in graph.items()
        if (plugin := plugin_of(module)) is not None
        for target in targets
        if not (is_core(target) or _within(target, "auditor.toolkit") or _within(target, plugin))
    }
    assert not stray, "\n".join(sorted(stray))


def test_the_core_and_toolkit_never_import_a_plugin(graph: dict[str, set[str]]) -> None:
    upward = {
        f"{module} -> {target}"
        for module, targets in graph.items()
        if is_core(module) or _within(module, "auditor.toolkit")
        for target in targets
        if _within(target, "auditor.plugins")
    }
    assert not upward, "\n".join(sorted(upward))


def test_the_core_is_the_layer_the_rules_name() -> None:
    assert is_core("auditor.bases") and is_core("auditor.audit.pipeline") and is_core("auditor.cli.console")
    assert is_core("auditor.formats.statedict") and is_core("auditor.report.document")
    assert not is_core("auditor.cli.root") and not is_core("auditor.cli") and not is_core("auditor.toolkit.edits")
    assert not is_core("auditor.plugins.restore.plan") and not is_core("auditor.plugins")
    assert not is_core("auditor.__main__")
    assert plugin_of("auditor.plugins.restore.plan") == "auditor.plugins.restore"
    assert plugin_of("auditor.plugins") is None
