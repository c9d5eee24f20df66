"""The report asks the component: a third-party detector is shown as richly as a built-in one."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

from auditor import Detector, Finding, LayerGraph, Param, Verdict, hookimpl
from auditor.report import text
from auditor.report.text import TIMES
from auditor.report.view import ComponentView, safe_svg, view_of
from auditor.toolkit import figures

EXPLANATION = "Census counts the layers of each kind; it is no watermark and says nothing of ownership."


class Census(Detector):
    id = "test-census"
    description = "counts layers"
    title = "Layer census"
    explanation = EXPLANATION
    # the deciding number first
    metric_labels: ClassVar[dict[str, str]] = {"share": "share of conv layers", "layers": "layers counted"}
    columns: ClassVar[dict[str, tuple[str, ...]]] = {"rows": ("name", "params")}
    params = (Param("scale", 1.0, "Multiplies the share.", float, minimum=0),)

    def detect(self, suspect: LayerGraph, *, bundle: Any, context: Mapping[str, Any]) -> list[Finding]:
        scale = self.settings(context)["scale"]
        rows = [{"params": layer.parameter_count, "name": layer.name} for layer in suspect.layers]
        convs = sum(1 for layer in suspect.layers if layer.kind.value == "conv2d")
        metrics = {"layers": len(rows), "share": scale * convs / len(rows), "alpha": 1}
        return [Finding(self.id, Verdict.INCONCLUSIVE, "counted", metrics=metrics, details={"rows": rows})]

    def figure(self, entry: Mapping[str, Any]) -> tuple[str, Any] | None:
        rows = entry["details"]["rows"]
        return "Parameters per layer.", figures.bars(
            [(r["name"], r["params"] / 5000, str(r["params"])) for r in rows], title="census chart"
        )


class Plugin:
    @hookimpl
    def register_detectors(self, register: Any) -> None:
        register(Census())


def test_a_third_party_detector_brings_its_words_order_columns_and_figure(
    gr_owner: SimpleNamespace, tmp_path: Path, audit: Callable[..., Any], plugin: Callable[..., Any]
) -> None:
    with plugin(Plugin(), "test-census"):
        _, data, html = audit(gr_owner.files["safetensors"], "--option", "test-census.scale=2", tmp_path)
    census = data["findings"][0]
    assert census["explanation"] == EXPLANATION
    assert census["metrics"]["share"] == 2 * 3 / 7  # the option reached the detector
    assert "--option test-census.scale=2.0" in data["command"]
    article = html[html.index("detector test-census") :]
    assert EXPLANATION in article
    assert "<title>census chart</title>" in article and "Parameters per layer." in article
    labels = re.findall(r'<th scope="row">([^<]+) <span class="muted mono">', article)
    assert labels[:3] == ["share of conv layers", "layers counted", "alpha"]  # declared order, then the rest
    head = re.search(r"<h4>rows</h4>\s*<table><thead><tr>(.*?)</tr>", article, re.S)
    assert head is not None and re.findall(r'<th scope="col">([^<]+)</th>', head.group(1)) == ["name", "params"]


def test_an_unsafe_or_broken_figure_is_left_out() -> None:
    assert safe_svg('<svg><rect width="3"/></svg>') is not None
    for bad in [
        "<svg><script>alert(1)</script></svg>",
        '<svg onload="alert(1)"></svg>',
        '<svg><a href="https://example.org">x</a></svg>',
        '<svg><image xlink:href="x.png"/></svg>',
        "<div>not a picture</div>",
        '<svg style="background:url(https://x)"></svg>',
    ]:
        assert safe_svg(bad) is None, bad

    class Broken(Census):
        id = "test-broken-figure"

        def figure(self, entry: Mapping[str, Any]) -> tuple[str, Any] | None:
            raise ValueError("no picture today")

    class Both:
        @hookimpl
        def register_detectors(self, register: Any) -> None:
            register(Broken())

    from auditor.plugin_manager import get_plugin_manager

    pm = get_plugin_manager()
    pm.register(Both(), name="test-both")
    try:
        assert view_of("detectors", "test-broken-figure").figure({"details": {"rows": []}}) is None
        assert view_of("detectors", "test-broken-figure").title == "Layer census"
    finally:
        pm.unregister(name="test-both")
    assert view_of("detectors", "not-installed").explanation().startswith("This finding comes from the detector")


def test_a_p_value_too_small_for_a_float_is_shown_from_its_log10() -> None:
    view = ComponentView("detectors", "not-installed", None)
    tiny = {"binomial_p": None, "log10_binomial_p": -330.51993765016675}
    assert view.metric_text("binomial_p", tiny) == f"3{TIMES}10^-331"
    old = {"binomial_p": 5e-324, "log10_binomial_p": -330.51993765016675}  # a denormal from an older report
    assert view.metric_text("binomial_p", old) == f"3{TIMES}10^-331"
    assert view.metric_text("log10_binomial_p", tiny) == "-330.520"
    assert view.metric_text("p", {"p": 0.25, "log10_p": math.log10(0.25)}) == "0.25"
    assert view.metric_text("p", {"p": None}) == "—"  # no log10 beside it: nothing to show, and no 0


class Claimant(Census):
    """Declares the first-screen words through the class attributes only."""

    id = "test-claimant"
    scheme = "test-scheme"
    p_metric = "log10_p"
    null_hypothesis = "the layers were counted at random"
    limitations = "Counting layers proves nothing about who trained them."
    metric_labels: ClassVar[dict[str, str]] = {"log10_p": "log10 p", "p": "p-value of the count"}


def test_the_first_screen_falls_back_to_plain_words() -> None:
    entry = {"verdict": "detected", "summary": "counted", "metrics": {"log10_p": -400.0, "p": None}}
    bundle = {"name": "b.json", "sha256": "ab" * 32}
    plain = ComponentView("detectors", "not-installed", None).first_screen(entry, bundle)
    assert plain == {
        "owner": f"the holder of owner bundle b.json (SHA-256 {'ab' * 32})", "owner_basis": "",
        "statistic": "counted", "log10_p": None, "p_label": "", "null_hypothesis": text.GENERIC_NULL,
        "not_proven": text.GENERIC_LIMITS,
    }  # fmt: skip
    declared = ComponentView("detectors", Claimant.id, Claimant()).first_screen(entry, bundle)
    assert declared["log10_p"] == -400.0 and declared["p_label"] == "p-value of the count"
    assert declared["statistic"] == "log10 p: -400.000"  # the first metric it declares
    assert declared["null_hypothesis"] == Claimant.null_hypothesis
    assert declared["not_proven"] == Claimant.limitations

    class Broken(Claimant):
        def first_screen(self, entry: Mapping[str, Any], bundle_entry: Mapping[str, Any] | None) -> dict[str, Any]:
            raise KeyError("owner")

    class Odd(Claimant):
        def first_screen(self, entry: Mapping[str, Any], bundle_entry: Mapping[str, Any] | None) -> dict[str, Any]:
            return {"owner": 42, "statistic": "  two\n lines ", "log10_p": "-3", "not_proven": ""}

    assert ComponentView("detectors", "x", Broken()).first_screen(entry, None)["owner"] == (
        "no owner: this check reads no owner bundle"
    )
    odd = ComponentView("detectors", "x", Odd()).first_screen(entry, bundle)
    assert odd["owner"].startswith("the holder of owner bundle b.json") and odd["statistic"] == "two lines"
    assert odd["log10_p"] is None and odd["not_proven"] == text.GENERIC_LIMITS
    assert Detector.describes(Claimant(), {}, LayerGraph(format="x", path=Path("x"), layers=[], edges=[])) is None
