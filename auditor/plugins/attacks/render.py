"""The robustness table as JSON, Markdown and a self-contained HTML page with inline SVG plots.

For every detector the table shows the verdict after the restore stage (when
the evaluation had a reference model) and without it, the detector's own
measure and log10 p-value (as the detector declares them:
:attr:`auditor.bases.Detector.measure`). The summary states, per scheme, which
function-preserving attacks it survived, and where pruning first defeats it
next to the accuracy the thief keeps there.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown", "page", "summary", "write_outputs"]


def _name(detector_id: str, *, short: bool = False) -> str:
    """The detector's title (or short title) as it declares it; its id when it is not installed."""
    from auditor.bases import Detector
    from auditor.plugin_manager import registered

    reg = registered("detectors").get(detector_id)
    d = reg.component if reg is not None and isinstance(reg.component, Detector) else None
    if d is None:
        return detector_id
    return (d.short_title if short and d.short_title else "") or d.display_name


_COLOURS = ("#222222", "#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _detectors(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({r["detector"] for c in cells for r in c.get("direct", [])})


def _row(cell: Mapping[str, Any], detector: str, which: str) -> Mapping[str, Any] | None:
    return next((r for r in cell.get(which) or [] if r["detector"] == detector), None)


def _final(cell: Mapping[str, Any], detector: str) -> Mapping[str, Any] | None:
    """The row the verdict rests on: after restore when there was a reference, else direct."""
    return _row(cell, detector, "restored") or _row(cell, detector, "direct")


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.1%}"


def _cell_text(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "-"
    value = "" if row.get("value") is None else f" {row['value']:.3f}"
    p = "" if row.get("log10_p") is None else f", log10 p {row['log10_p']:.1f}"
    return f"{row['verdict']}{value}{p}"


def attack_note(cell: Mapping[str, Any]) -> str:
    """One line of what the attack itself reported (forgeries, the adversary's own watermark)."""
    s = cell.get("summary") or {}
    if cell.get("status") == "error":
        return f"error: {cell.get('error', '')}"
    if cell.get("status") == "n/a":
        return f"not applicable: {cell.get('why', '')}"
    if "adversary_rates" in s:
        return "adversary's rates " + ", ".join(f"{v:.2f}" for v in s["adversary_rates"].values())
    if "adversary_acc_combined" in s:
        return f"adversary's Acc_combined {s['adversary_acc_combined']:.1%}"
    if "claims" in s:
        return f"forged rates {s['min_rate']:.3f}-{s['max_rate']:.3f} (mean {s['mean_rate']:.3f}); claims {s['claims']}"
    if "max_correlated_kernels" in s:
        return (f"best key ties {s['max_correlated_kernels']} kernels; forged HufuNet {s['accuracy']:.1%}; "
                f"claim: {'yes' if s['claim'] else 'no'}")  # fmt: skip
    if "found" in s:
        found = ", ".join(f"+-{k} {v:.0%}" for k, v in s["found"].items())
        return f"kernels found {found}; forged HufuNet {s['accuracy']:.1%}; claim: {'yes' if s['claim'] else 'no'}"
    return ""


def _detected(cell: Mapping[str, Any], detector: str, which: str) -> bool:
    row = _final(cell, detector) if which == "final" else _row(cell, detector, which)
    return row is not None and row["verdict"] == "detected"


def _breaking_point(points: list[Mapping[str, Any]], detector: str, which: str) -> str:
    """Where a pruning series first defeats ``detector`` and the accuracy the thief keeps around it."""
    fail = next((c for c in points if not _detected(c, detector, which)), None)
    if fail is None:
        top = points[-1]
        return f"detected at every rate up to {top['strength']:.0%} (the thief keeps {_pct(top['accuracy'])})"
    held = [c for c in points if c["strength"] < fail["strength"]]
    last = f"; at {held[-1]['strength']:.0%}, still detected, {_pct(held[-1]['accuracy'])}" if held else ""
    return f"first missed at {fail['strength']:.0%}, where the thief keeps {_pct(fail['accuracy'])}{last}"


def summary(results: Mapping[str, Any]) -> list[str]:
    """Plain sentences: function-preserving attacks, pruning breaking points, fine-tuning, overwriting, and
    the cells where restoring lost a detection that the unrestored model gave."""
    cells = [c for c in results["cells"] if c.get("status") == "ok"]
    lines = []
    restored = bool(results.get("reference"))
    after = "after restore" if restored else "without restore (no reference model)"
    for det in _detectors(cells):
        name = _name(det)
        fp = [c for c in cells if c["group"] == "function-preserving"]
        missed = [c["label"] for c in fp if not _detected(c, det, "final")]
        lines.append(f"{name}, {after}: detected through {len(fp) - len(missed)} of {len(fp)} function-preserving "
                     f"attacks" + (f"; missed: {'; '.join(missed)}." if missed else "."))  # fmt: skip
        for series in ("magnitude pruning, global", "magnitude pruning, per layer"):
            points = sorted((c for c in cells if c.get("series") == series), key=lambda c: c["strength"])
            if points:
                text = _breaking_point(points, det, "final")
                if restored:
                    text = f"after restore {text}; without restore {_breaking_point(points, det, 'direct')}"
                lines.append(f"{name}, {series}: {text}.")
        for group in ("fine-tuning", "overwriting"):
            rows = [c for c in cells if c["group"] == group]
            if rows:
                held = sum(_detected(c, det, "final") for c in rows)
                lines.append(f"{name}, {group}: detected in {held} of {len(rows)} cells.")
        lost = [c["label"] for c in cells
                if restored and _detected(c, det, "direct") and not _detected(c, det, "restored")]  # fmt: skip
        if lost:
            lines.append(f"{name}: restoring lost a detection the unrestored model gave in: {'; '.join(lost)}.")
    errors = [c["label"] for c in results["cells"] if c.get("status") == "error"]
    if errors:
        lines.append(f"Cells that failed to run: {'; '.join(errors)}.")
    inapplicable = [f"{c['label']} ({c.get('why', '')})" for c in results["cells"] if c.get("status") == "n/a"]
    if inapplicable:
        lines.append(f"Cells that do not apply to this model: {'; '.join(inapplicable)}.")
    return lines


def markdown(results: Mapping[str, Any]) -> str:
    """The Markdown report: inputs, summary sentences, the table."""
    cells = results["cells"]
    dets = _detectors(cells)
    restored = bool(results.get("reference"))
    head = ["attack", "group", "accuracy", "max output change"]
    for det in dets:
        head += [f"{_name(det)} after restore", "direct"] if restored else [_name(det)]
    head.append("attack's own result")
    out = [f"# Robustness of `{results['model']}`", ""]
    out += ["- bundles: " + ", ".join(f"{b['scheme']} (sha256 {b['sha256'][:12]})" for b in results["bundles"]),
            f"- reference for restore: `{results['reference']}`" if restored else "- no reference: no restore",
            f"- grid: {results['grid']}, {len(cells)} cells; this run {results['seconds_this_run']} s", ""]  # fmt: skip
    out += [f"- {line}" for line in summary(results)] + ["", "| " + " | ".join(head) + " |",
                                                           "|" + "---|" * len(head)]  # fmt: skip
    for c in cells:
        change = c.get("max_output_change")
        row = [c["label"], c["group"], _pct(c.get("accuracy")), "-" if change is None else f"{change:.1e}"]
        for det in dets:
            row += [_cell_text(_row(c, det, "restored")), _cell_text(_row(c, det, "direct"))] if restored else [
                _cell_text(_row(c, det, "direct"))]  # fmt: skip
        row.append(attack_note(c))
        out.append("| " + " | ".join(x.replace("|", "/") for x in row) + " |")
    return "\n".join(out) + "\n"


def _svg(title: str, xs_label: str, series: Mapping[str, list[tuple[float, float, bool | None]]]) -> str:
    """A line chart, y from 0 to 1; a hollow marker is a point where that detector did not detect."""
    w, h, left, right, top, bottom = 580, 260, 50, 190, 28, 36
    points = [p for pts in series.values() for p in pts]
    if not points:
        return ""
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    span = (x1 - x0) or 1.0

    def sx(x: float) -> float:
        return left + (x - x0) / span * (w - left - right)

    def sy(y: float) -> float:
        return top + (1 - y) * (h - top - bottom)

    name = html.escape(title)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{name}">',
             f'<text x="{left}" y="16" font-size="13" font-weight="bold">{name}</text>']  # fmt: skip
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        y = sy(tick)
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                     f"{tick:.0%}</text>")  # fmt: skip
    for x in sorted({p[0] for p in points}):
        label = f"{x:.0%}" if x1 <= 1 else f"{x:g}"
        parts.append(f'<text x="{sx(x):.1f}" y="{h - bottom + 14}" font-size="10" text-anchor="middle">'
                     f"{label}</text>")  # fmt: skip
    parts.append(f'<text x="{(left + w - right) / 2:.0f}" y="{h - 6}" font-size="11" text-anchor="middle">'
                 f"{html.escape(xs_label)}</text>")  # fmt: skip
    for i, (name, pts) in enumerate(series.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in sorted(pts))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{line}"/>')
        for x, y, ok in pts:
            fill = colour if ok is not False else "white"
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{fill}" stroke="{colour}"/>')
        parts.append(f'<text x="{w - right + 10}" y="{top + 16 * i + 10}" font-size="11" fill="{colour}">'
                     f"{html.escape(name)}</text>")  # fmt: skip
    parts.append("</svg>")
    return "\n".join(parts)


def _plots(results: Mapping[str, Any]) -> list[str]:
    cells = [c for c in results["cells"] if c.get("status") == "ok" and c.get("series")]
    svgs = []
    for name in dict.fromkeys(c["series"] for c in cells):
        pts = [c for c in cells if c["series"] == name]
        series: dict[str, list[tuple[float, float, bool | None]]] = {
            "thief's accuracy": [(c["strength"], c["accuracy"], None) for c in pts if c.get("accuracy") is not None]
        }
        for det in _detectors(pts):
            measure = next((r["measure"] for c in pts if (r := _final(c, det))), "")
            series[f"{_name(det, short=True)} {measure}"] = [
                (c["strength"], r["value"], r["verdict"] == "detected") for c in pts
                if (r := _final(c, det)) is not None and r.get("value") is not None
            ]  # fmt: skip
        x_label = "epochs" if max(c["strength"] for c in pts) > 1 else "rate"
        svgs.append(_svg(name, x_label, series))
    return [s for s in svgs if s]


def page(results: Mapping[str, Any]) -> str:
    """A self-contained HTML page (no scripts, no external resources): summary, plots, the table."""
    md_rows = markdown(results).splitlines()
    table = [ln for ln in md_rows if ln.startswith("|")]
    head, body = table[0], table[2:]

    def cells_of(line: str) -> list[str]:
        return [html.escape(x.strip()) for x in line.strip("|").split(" | ")]

    rows = "\n".join("<tr>" + "".join(f"<td>{x}</td>" for x in cells_of(r)) + "</tr>" for r in body)
    summary_items = "\n".join(f"<li>{html.escape(s)}</li>" for s in summary(results))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Robustness of {html.escape(results["model"])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:110em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:3px 6px;vertical-align:top}}th{{background:#f3f3f3}}
figure{{display:inline-block;margin:0 1em 1em 0}}</style></head><body>
<h1>Robustness of <code>{html.escape(results["model"])}</code></h1>
<p>{len(results["cells"])} cells; reference for restore: {html.escape(str(results.get("reference")))}.
Plots (after restore when there was a reference): filled markers are cells where the detector found the
watermark, hollow ones where it did not.</p>
<ul>{summary_items}</ul>
{"".join(f"<figure>{s}</figure>" for s in _plots(results))}
<table><thead><tr>{"".join(f"<th>{x}</th>" for x in cells_of(head))}</tr></thead>
<tbody>{rows}</tbody></table></body></html>
"""


def write_outputs(results: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write robustness.json, robustness.md and robustness.html into ``out_dir``."""
    paths = {"json": out_dir / "robustness.json", "markdown": out_dir / "robustness.md",
             "html": out_dir / "robustness.html"}  # fmt: skip
    paths["json"].write_text(json.dumps({**results, "summary": summary(results)}, indent=1, default=str) + "\n")
    paths["markdown"].write_text(markdown(results))
    paths["html"].write_text(page(results))
    return paths
