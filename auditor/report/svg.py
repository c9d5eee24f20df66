"""The report's pictures: small inline SVG written here, no script and no external resource.

Each function returns markup ready to drop into the HTML (text escaped,
coordinates with one decimal, so the same numbers always give the same bytes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from markupsafe import Markup, escape

__all__ = ["PERMUTATION_KEYS", "bit_agreement", "channel_matching", "hufunet_accuracy", "restore_similarity"]

#: Keys a restorer's per-layer row may use for its channel assignment (suspect channel -> reference channel).
PERMUTATION_KEYS = ("permutation", "assignment", "matching", "order")
_W = 680
_BLUE, _AMBER, _GREY, _RED, _GREEN = "#2b6cb0", "#b7791f", "#a0aec0", "#c53030", "#2f855a"


def _n(x: float) -> str:
    return f"{x:.1f}"


def _text(x: float, y: float, s: str, *, anchor: str = "start", size: int = 12, fill: str = "#111") -> str:
    return f'<text x="{_n(x)}" y="{_n(y)}" font-size="{size}" text-anchor="{anchor}" fill="{fill}">{escape(s)}</text>'


def _svg(height: float, title: str, body: list[str]) -> Markup:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{_W}" height="{_n(height)}"'
        f' viewBox="0 0 {_W} {_n(height)}" font-family="system-ui, sans-serif"><title>{escape(title)}</title>'
    )
    return Markup(head + "".join(body) + "</svg>")  # noqa: S704 (every piece of text above went through escape)


def _short(name: str, limit: int = 30) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _axis(x0: float, width: float, y_top: float, y_bottom: float, ticks: Sequence[float]) -> list[str]:
    out = []
    for t in ticks:
        x = x0 + width * t
        out.append(f'<line x1="{_n(x)}" y1="{_n(y_top)}" x2="{_n(x)}" y2="{_n(y_bottom)}" stroke="#e2e8f0"/>')
        out.append(_text(x, y_bottom + 14, f"{t:.0%}", anchor="middle", size=11, fill="#4a5568"))
    return out


def _finite(value: Any) -> float | None:
    return (
        float(value)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        else None
    )


def bit_agreement(rows: Sequence[Mapping[str, Any]]) -> Markup:
    """Greedy Residuals: per layer, the share of signature bits the residual signs match, against 50% chance."""
    x0, width, top, step = 200.0, 340.0, 26.0, 26.0
    bottom = top + step * max(len(rows), 1)
    body = _axis(x0, width, top - 6, bottom, (0, 0.25, 0.5, 0.75, 1))
    for i, row in enumerate(rows):
        y = top + i * step
        body.append(_text(x0 - 8, y + 15, _short(str(row.get("name", ""))), anchor="end"))
        rate = _finite(row.get("rate"))
        if rate is None:
            body.append(_text(x0 + 4, y + 15, "not found in the suspect", fill="#4a5568"))
            continue
        colour = _AMBER if row.get("inverted") else _BLUE
        body.append(
            f'<rect x="{_n(x0)}" y="{_n(y + 4)}" width="{_n(width * min(max(rate, 0), 1))}" height="16"'
            f' fill="{colour}"/>'
        )
        body.append(_text(x0 + width + 8, y + 16, f"{rate:.1%} ({row.get('k')}/{row.get('bits')})"))
    chance = x0 + width * 0.5
    body.append(
        f'<line x1="{_n(chance)}" y1="{_n(top - 10)}" x2="{_n(chance)}" y2="{_n(bottom)}" stroke="{_RED}"'
        ' stroke-width="2" stroke-dasharray="5,3"/>'
    )
    body.append(_text(chance, top - 12, "chance: 50%", anchor="middle", size=11, fill=_RED))
    return _svg(bottom + 22, "Signature bits matched per layer, against the 50% expected by chance", body)


def hufunet_accuracy(metrics: Mapping[str, Any]) -> Markup | None:
    """HufuNet: Acc_combined on an accuracy axis, with chance, the tau_acc threshold and Acc_original marked."""
    combined, original = _finite(metrics.get("acc_combined")), _finite(metrics.get("acc_original"))
    tau, chance = _finite(metrics.get("tau_acc")), _finite(metrics.get("chance"))
    if combined is None:
        return None
    x0, width, y = 20.0, 620.0, 70.0
    body = _axis(x0, width, 50, y + 30, (0, 0.2, 0.4, 0.6, 0.8, 1))
    body.append(
        f'<rect x="{_n(x0)}" y="{_n(y)}" width="{_n(width * min(max(combined, 0), 1))}" height="24" fill="{_BLUE}"/>'
    )
    body.append(_text(x0 + 6, y + 17, f"Acc_combined {combined:.2%}", fill="#fff"))
    marks: list[tuple[float, str, str, str]] = []
    if chance is not None:
        marks.append((chance, f"chance {chance:.0%}", _GREY, "4,3"))
    if original is not None and tau is not None:
        marks.append((original * (1 - tau), f"threshold {original * (1 - tau):.1%} (DiffAcc < {tau:g})", _RED, "5,3"))
    if original is not None:
        marks.append((original, f"Acc_original {original:.1%}", "#111", ""))
    for level, (value, words, colour, dash) in enumerate(sorted(marks)):
        x = x0 + width * min(max(value, 0), 1)
        label_y = 14 + 16 * (level % 3)
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        body.append(
            f'<line x1="{_n(x)}" y1="{_n(label_y + 4)}" x2="{_n(x)}" y2="{_n(y + 30)}" stroke="{colour}"'
            f' stroke-width="2"{dashes}/>'
        )
        anchor = "end" if x > x0 + width * 0.7 else "start"
        body.append(_text(x + (-4 if anchor == "end" else 4), label_y, words, anchor=anchor, size=11, fill=colour))
    return _svg(y + 50, "Accuracy of the rebuilt HufuNet against chance and the ownership threshold", body)


def restore_similarity(rows: Sequence[Mapping[str, Any]]) -> Markup | None:
    """Restore: per layer, similarity to the reference before (grey) and after (green) aligning."""
    shown = [r for r in rows if _finite(r.get("similarity_before")) is not None or _finite(r.get("similarity_after"))]
    if not shown:
        return None
    x0, width, top, step = 170.0, 280.0, 28.0, 30.0
    bottom = top + step * len(shown)
    body = _axis(x0, width, top - 6, bottom, (0, 0.5, 1))
    body.append(f'<rect x="{_n(x0)}" y="6" width="12" height="10" fill="{_GREY}"/>')
    body.append(_text(x0 + 16, 15, "before", size=11))
    body.append(f'<rect x="{_n(x0 + 70)}" y="6" width="12" height="10" fill="{_GREEN}"/>')
    body.append(_text(x0 + 86, 15, "after aligning", size=11))
    for i, row in enumerate(shown):
        y = top + i * step
        body.append(_text(x0 - 8, y + 17, _short(str(row.get("name", "")), 24), anchor="end"))
        for j, (key, colour) in enumerate((("similarity_before", _GREY), ("similarity_after", _GREEN))):
            value = _finite(row.get(key))
            if value is not None:
                w = width * min(max(abs(value), 0), 1)
                body.append(
                    f'<rect x="{_n(x0)}" y="{_n(y + 4 + 11 * j)}" width="{_n(w)}" height="10" fill="{colour}"/>'
                )
        counts = [f"{k} {row[k]}" for k in ("moved", "padded", "dropped") if isinstance(row.get(k), int)]
        body.append(_text(x0 + width + 8, y + 17, ", ".join(counts), size=11, fill="#4a5568"))
    return _svg(bottom + 22, "Similarity of each layer to the reference before and after aligning", body)


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
        _text(x0, 14, f"{_short(str(row.get('name', '')), 60)}: channel matching"),
        _text(x0 - 10, y_top + 4, "suspect", anchor="end", size=11, fill="#4a5568"),
        _text(x0 - 10, y_bottom + 4, "reference", anchor="end", size=11, fill="#4a5568"),
    ]
    for i in range(n):  # every channel slot on both rows, so a padded reference channel shows as a lone dot
        for y, count in ((y_top, len(perm)), (y_bottom, n)):
            if i < count:
                body.append(f'<circle cx="{_n(x0 + i * step)}" cy="{_n(y)}" r="2" fill="#4a5568"/>')
    for i, j in enumerate(perm):
        x = x0 + i * step
        if j is None or j < 0:
            body.append(f'<path d="M{_n(x - 4)} {_n(y_top - 12)}l8 8m0 -8l-8 8" stroke="{_RED}" stroke-width="1.5"/>')
            continue
        colour = _GREY if i == j else _BLUE
        body.append(
            f'<line x1="{_n(x)}" y1="{_n(y_top)}" x2="{_n(x0 + j * step)}" y2="{_n(y_bottom)}" stroke="{colour}"'
            ' stroke-width="1.2"/>'
        )
    moved = sum(1 for i, j in enumerate(perm) if j is not None and j >= 0 and i != j)
    dropped = sum(1 for j in perm if j is None or j < 0)
    summary = f"{len(perm)} suspect channels, {moved} moved, {dropped} dropped; {n} reference channels"
    body.append(_text(x0, y_bottom + 20, summary, size=11, fill="#4a5568"))
    return _svg(y_bottom + 30, f"Channel matching of layer {row.get('name', '')}", body)
