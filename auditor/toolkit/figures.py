"""Small inline SVG charts for the evidence report: no script, no external resource, text escaped.

A detector's or restorer's :meth:`~auditor.bases.Presentable.figure` draws its
picture with these, so every chart in a report looks alike and is safe to
embed. Coordinates are written with one decimal, so the same numbers always
give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from markupsafe import Markup, escape

__all__ = [
    "AMBER", "BLUE", "GREEN", "GREY", "PERMUTATION_KEYS", "RED", "WIDTH", "alignment", "axis", "bars",
    "channel_matching", "finite", "num", "restore_similarity", "short", "svg", "text",
]  # fmt: skip

WIDTH = 680
#: Keys a restorer's per-layer row may use for its channel assignment (suspect channel -> reference channel).
PERMUTATION_KEYS = ("permutation", "assignment", "matching", "order")
BLUE, AMBER, GREY, RED, GREEN = "#2b6cb0", "#b7791f", "#a0aec0", "#c53030", "#2f855a"


def num(x: float) -> str:
    """``x`` with one decimal, as every coordinate is written."""
    return f"{x:.1f}"


def text(x: float, y: float, s: str, *, anchor: str = "start", size: int = 12, fill: str = "#111") -> str:
    """A ``<text>`` element with ``s`` escaped."""
    return f'<text x="{num(x)}" y="{num(y)}" font-size="{size}" text-anchor="{anchor}" fill="{fill}">{escape(s)}</text>'


def svg(height: float, title: str, body: list[str]) -> Markup:
    """The whole picture: ``body`` (elements made here, text escaped) under an escaped ``title``."""
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{WIDTH}" height="{num(height)}"'
        f' viewBox="0 0 {WIDTH} {num(height)}" font-family="system-ui, sans-serif"><title>{escape(title)}</title>'
    )
    return Markup(head + "".join(body) + "</svg>")  # noqa: S704 (every piece of text above went through escape)


def short(name: str, limit: int = 30) -> str:
    """``name`` cut to ``limit`` characters with an ellipsis."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


def axis(x0: float, width: float, y_top: float, y_bottom: float, ticks: Sequence[float]) -> list[str]:
    """Vertical grid lines at the fractions ``ticks`` of ``width``, labelled as percentages."""
    out = []
    for t in ticks:
        x = x0 + width * t
        out.append(f'<line x1="{num(x)}" y1="{num(y_top)}" x2="{num(x)}" y2="{num(y_bottom)}" stroke="#e2e8f0"/>')
        out.append(text(x, y_bottom + 14, f"{t:.0%}", anchor="middle", size=11, fill="#4a5568"))
    return out


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else ``None``."""
    return (
        float(value)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        else None
    )


def bars(
    rows: Sequence[tuple[str, Any, str]], *, title: str, mark: tuple[float, str] | None = None, colour: str = BLUE
) -> Markup | None:
    """A horizontal bar per ``(label, fraction 0..1, note)`` row, on a 0-100% axis; ``mark`` draws a dashed
    line at a fraction with its words (a threshold or chance). ``None`` when no row has a finite value."""
    if not any(finite(v) is not None for _, v, _ in rows):
        return None
    x0, width, top, step = 200.0, 340.0, 26.0, 26.0
    bottom = top + step * len(rows)
    body = axis(x0, width, top - 6, bottom, (0, 0.25, 0.5, 0.75, 1))
    for i, (label, value, note) in enumerate(rows):
        y = top + i * step
        body.append(text(x0 - 8, y + 15, short(str(label)), anchor="end"))
        v = finite(value)
        if v is not None:
            body.append(
                f'<rect x="{num(x0)}" y="{num(y + 4)}" width="{num(width * min(max(v, 0), 1))}" height="16"'
                f' fill="{colour}"/>'
            )
        body.append(text(x0 + width + 8, y + 16, str(note)))
    if mark is not None:
        at = x0 + width * min(max(mark[0], 0), 1)
        body.append(
            f'<line x1="{num(at)}" y1="{num(top - 10)}" x2="{num(at)}" y2="{num(bottom)}" stroke="{RED}"'
            ' stroke-width="2" stroke-dasharray="5,3"/>'
        )
        body.append(text(at, top - 12, mark[1], anchor="middle", size=11, fill=RED))
    return svg(bottom + 22, title, body)


def restore_similarity(rows: Sequence[Mapping[str, Any]]) -> Markup | None:
    """Restore: per layer, similarity to the reference before (grey) and after (green) aligning."""
    shown = [r for r in rows if finite(r.get("similarity_before")) is not None or finite(r.get("similarity_after"))]
    if not shown:
        return None
    x0, width, top, step = 170.0, 280.0, 28.0, 30.0
    bottom = top + step * len(shown)
    body = axis(x0, width, top - 6, bottom, (0, 0.5, 1))
    body.append(f'<rect x="{num(x0)}" y="6" width="12" height="10" fill="{GREY}"/>')
    body.append(text(x0 + 16, 15, "before", size=11))
    body.append(f'<rect x="{num(x0 + 70)}" y="6" width="12" height="10" fill="{GREEN}"/>')
    body.append(text(x0 + 86, 15, "after aligning", size=11))
    for i, row in enumerate(shown):
        y = top + i * step
        body.append(text(x0 - 8, y + 17, short(str(row.get("name", "")), 24), anchor="end"))
        for j, (key, colour) in enumerate((("similarity_before", GREY), ("similarity_after", GREEN))):
            value = finite(row.get(key))
            if value is not None:
                w = width * min(max(abs(value), 0), 1)
                body.append(
                    f'<rect x="{num(x0)}" y="{num(y + 4 + 11 * j)}" width="{num(w)}" height="10" fill="{colour}"/>'
                )
        counts = [f"{k} {row[k]}" for k in ("moved", "padded", "dropped") if isinstance(row.get(k), int)]
        body.append(text(x0 + width + 8, y + 17, ", ".join(counts), size=11, fill="#4a5568"))
    return svg(bottom + 22, "Similarity of each layer to the reference before and after aligning", body)


def _permutation(row: Mapping[str, Any]) -> list[int | None] | None:
    for key in PERMUTATION_KEYS:
        value = row.get(key)
        if isinstance(value, list) and value and all(v is None or (type(v) is int) for v in value):
            return list(value)
    return None


def channel_matching(row: Mapping[str, Any], limit: int = 256) -> Markup | None:
    """Restore: one layer's channel assignment as lines from suspect channels (top) to reference channels
    (bottom); straight lines kept their place, slanted ones were moved, a cross marks a dropped channel."""
    perm = _permutation(row)
    if perm is None or len(perm) > limit:
        return None
    targets = [p for p in perm if p is not None and p >= 0]
    n = max(len(perm), (max(targets) + 1) if targets else 0)
    x0, width, y_top, y_bottom = 90.0, 570.0, 34.0, 104.0
    step = width / max(n - 1, 1)
    body = [
        text(x0, 14, f"{short(str(row.get('name', '')), 60)}: channel matching"),
        text(x0 - 10, y_top + 4, "suspect", anchor="end", size=11, fill="#4a5568"),
        text(x0 - 10, y_bottom + 4, "reference", anchor="end", size=11, fill="#4a5568"),
    ]
    for i in range(n):  # every channel slot on both rows, so a padded reference channel shows as a lone dot
        for y, count in ((y_top, len(perm)), (y_bottom, n)):
            if i < count:
                body.append(f'<circle cx="{num(x0 + i * step)}" cy="{num(y)}" r="2" fill="#4a5568"/>')
    for i, j in enumerate(perm):
        x = x0 + i * step
        if j is None or j < 0:
            body.append(f'<path d="M{num(x - 4)} {num(y_top - 12)}l8 8m0 -8l-8 8" stroke="{RED}" stroke-width="1.5"/>')
            continue
        colour = GREY if i == j else BLUE
        body.append(
            f'<line x1="{num(x)}" y1="{num(y_top)}" x2="{num(x0 + j * step)}" y2="{num(y_bottom)}" stroke="{colour}"'
            ' stroke-width="1.2"/>'
        )
    moved = sum(1 for i, j in enumerate(perm) if j is not None and j >= 0 and i != j)
    dropped = sum(1 for j in perm if j is None or j < 0)
    summary = f"{len(perm)} suspect channels, {moved} moved, {dropped} dropped; {n} reference channels"
    body.append(text(x0, y_bottom + 20, summary, size=11, fill="#4a5568"))
    return svg(y_bottom + 30, f"Channel matching of layer {row.get('name', '')}", body)


def alignment(entry: Mapping[str, Any]) -> tuple[str, Markup] | None:
    """A restore log entry's pictures (``entry["log"]["layers"]``: rows with ``name``, ``similarity_before``,
    ``similarity_after``, ``moved``/``padded``/``dropped`` and a channel assignment under one of
    :data:`PERMUTATION_KEYS`): the similarity chart and the channel matching of the first twelve layers, with
    their caption; ``None`` when the log has no such rows. Any restorer that aligns channels can show these."""
    log = entry.get("log")
    rows = log.get("layers") if isinstance(log, Mapping) else None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, Mapping) for r in rows):
        return None
    pictures = [p for p in [restore_similarity(rows), *(channel_matching(r) for r in rows[:12])] if p is not None]
    if not pictures:
        return None
    caption = (
        "Similarity of each layer to the reference before (grey) and after (green) aligning, then how each"
        " layer's channels were matched: straight lines kept their place, slanted ones were moved, a cross marks"
        " a dropped channel."
    )
    return caption, Markup("".join(pictures))  # noqa: S704 (each picture is escaped markup from toolkit.figures)
