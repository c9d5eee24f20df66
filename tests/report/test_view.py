"""The report asks the component: a third-party detector is shown as richly as a built-in one."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

from auditor import Detector, Finding, LayerGraph, Param, Verdict, hookimpl
from auditor.report.view import safe_svg, view_of
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
