"""Meta-tests: every hook is tested and documented; the README's exit codes are the real ones; the docs
point only at things the repository holds."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
from pathlib import Path

import pytest

from auditor import hookspecs
from auditor.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "auditor_spec"))


def test_hooks_are_found() -> None:
    assert len(HOOKS) == 7, HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook: str) -> None:
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    assert re.search(rf"^def test_hook_{hook}\(", tests, re.M), f"no test_hook_{hook} in tests/"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook: str) -> None:
    doc = (ROOT / "docs" / "plugin_hooks.md").read_text()
    section = re.search(rf"^### `{hook}`\n(.*?)(?=^### |\Z)", doc, re.M | re.S)
    assert section, f"no section for {hook} in docs/plugin_hooks.md"
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"def {hook}({params}:" in section.group(1)


def test_every_hook_has_a_docstring() -> None:
    for hook in HOOKS:
        assert (getattr(hookspecs, hook).__doc__ or "").strip(), hook


def test_readme_lists_every_exit_code() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", readme, re.M))
    assert {int(k): v for k, v in rows.items()} == EXIT_CODES


#: The design workspace the project was specified in lives outside the repository; a clone does not have it.
OUTSIDE = re.compile(rb"shar[e]d/(?:specs|seeds)|\.\./shar[e]d|/work/shar[e]d")
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def tracked_files() -> list[Path]:
    """The repository's tracked files that exist in the working tree."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listing.decode("utf-8").split("\0") if name and (ROOT / name).is_file()]


def test_no_file_points_outside_the_repository() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in tracked_files()
        for number, line in enumerate(path.read_bytes().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not offenders, "design files a clone does not have (cite docs/design/ instead):\n" + "\n".join(offenders)


def _prose(doc: Path) -> str:
    return FENCE.sub("", doc.read_text(encoding="utf-8"))


def _anchors(doc: Path) -> set[str]:
    """GitHub's anchors for the headings of ``doc``."""
    headings = re.findall(r"^#+ (.+)$", _prose(doc), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_in_the_docs_resolve() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(doc)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def _top_level_names(module: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _resolves(dotted: str) -> bool:
    """Whether ``auditor.x.y.Name`` names a module of the package, or a top-level name in one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if module.is_file():
            rest = parts[cut:]
            return not rest or rest[0] in _top_level_names(module) or (base / f"{rest[0]}.py").is_file()
    return False


def test_docs_name_modules_and_files_that_exist() -> None:
    missing = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for dotted in sorted(set(re.findall(r"(?<![\w/.-])auditor(?:\.[A-Za-z_]\w*)+", text))):
            if not _resolves(dotted):
                missing.append(f"{doc.relative_to(ROOT)}: {dotted}")
        for path in sorted(
            set(re.findall(r"(?<![\w/.-])(?:auditor|tests|scripts|benchmarks|examples)/[\w./-]*", text))
        ):
            if not (ROOT / path.rstrip(".")).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not missing, "no such module, name or file:\n" + "\n".join(missing)


def test_the_example_detector_in_plugin_hooks_runs_as_documented() -> None:
    from auditor.audit.load import load_model
    from auditor.errors import UsageError
    from auditor.report.view import safe_svg

    doc = (ROOT / "docs" / "plugin_hooks.md").read_text(encoding="utf-8")
    block = re.search(r'^```python\n("""An auditor plugin.*?)^```', doc, re.M | re.S)
    assert block, "no example detector in docs/plugin_hooks.md"
    namespace: dict[str, object] = {"__name__": "plugin_hooks_example"}
    exec(compile(block.group(1), "docs/plugin_hooks.md", "exec"), namespace)
    detector = namespace["ZeroWeights"]()  # type: ignore[operator]

    graph = load_model(ROOT / "tests" / "assets" / "st_cnn.safetensors")
    [finding] = detector.detect(graph, bundle=None, context={"options": {"threshold": "0.3"}})
    entry = finding.to_dict()
    assert entry["metrics"] == {"pruned_layers": 0, "threshold": 0.3, "layers": 4}
    assert list(entry["metrics"]) == list(detector.metric_labels)
    caption, svg = detector.figure(entry)
    assert caption and safe_svg(svg) is not None and "Exactly-zero weights per layer" in svg
    assert detector.headline(entry) == "0 of 4 layers look pruned"
    prose = " ".join(doc.split())
    for bad in ({"treshold": 1}, {"threshold": 2}):
        with pytest.raises(UsageError) as error:
            detector.options(bad)
        assert f"`{error.value}`" in prose  # the messages the docs quote are the real ones


def test_the_architecture_layout_names_modules_that_exist() -> None:
    modules = {p.name for p in (ROOT / "auditor").rglob("*.py")}
    named = set(re.findall(r"(?<![\w/.-])(\w+\.py)\b", (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")))
    assert named - modules == set(), "docs/architecture.md names modules auditor/ does not have"
