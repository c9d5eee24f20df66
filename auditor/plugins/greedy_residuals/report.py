"""How Greedy Residuals findings are shown: the explanation, metric labels (deciding number first),
the public details, table columns, the bit-agreement figure and the bundle summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from markupsafe import Markup

from auditor.toolkit.figures import AMBER, BLUE, RED, axis, finite, num, short, svg, text

__all__ = ["COLUMNS", "EXPLANATION", "METRIC_LABELS", "PUBLIC_DETAILS", "bit_agreement", "bundle_summary", "figure"]

EXPLANATION = (
    "Greedy Residuals hides a 256-bit code in the signs of averaged weights (the residuals) of a few chosen"
    " layers; the code is derived from the owner's digital signature on the copyright statement, and the"
    " audit first checks that this signature verifies under the public key in the owner's bundle. For each"
    " layer the audit counts how many residual signs agree with the code. A model that never carried the"
    " watermark agrees on about half of them, as coin flips would (the 50% line in the picture). The"
    " p-value is the probability that chance alone gives an agreement at least this far from half, corrected"
    " for the number of layers tried; the verdict is 'found' only when it is below the threshold shown. The"
    " forging bound is the paper's estimate of how likely a forger's random signature would fit as well."
    " What this does not prove: who owns the public key (that needs outside evidence, such as a dated"
    " publication of the key or the signed statement), when or by whom the suspect was copied, or that the"
    " owner did not train the suspect themselves. 'Not found' does not prove independence: heavy retraining,"
    " distillation or edits the restore stage did not undo can erase the code."
)

#: The deciding number first: the combined p-value against its threshold, then the evidence behind it.
METRIC_LABELS = {
    "log10_combined_p": "log10 p-value (Bonferroni)",
    "combined_p": "p-value (Bonferroni over layers)",
    "p_threshold": "p-value threshold",
    "identity_verified": "owner's signature verifies",
    "best_detection_rate": "detection rate in the best layer",
    "best_layer": "best layer",
    "best_k": "matching bits in the best layer",
    "bits": "signature bits per layer",
    "best_rate": "match rate in the best layer",
    "layers_tried": "layers compared",
    "layers_missing": "layers not found in the suspect",
    "log10_fisher_p": "log10 p-value (Fisher)",
    "fisher_p": "p-value (Fisher's method)",
    "log10_min_forging_bound": "log10 forging bound",
    "min_forging_bound": "forging bound",
    "suspect_layers_m": "suspect layers a forger could use (M)",
    "k": "matching bits",
    "log10_p": "log10 p-value",
    "log10_forging_bound": "log10 forging bound",
    "suspect_name": "suspect layer",
    "found_by": "found by",
    "release_rate": "rate at release",
    "inverted": "negated",
    "message": "copyright statement",
    "signature_algorithm": "signature algorithm",
    "public_key_sha256": "public key fingerprint (sha256)",
    "layers": "watermarked layers",
}
#: The finding details a report carries; the identity block is cut to :data:`IDENTITY_KEYS`.
PUBLIC_DETAILS = ("identity", "params", "params_note", "layers", "notes", "forging_check")
#: The bundle section names the public key by its fingerprint; the detector's own hash of the PEM text is left out.
IDENTITY_KEYS = ("verified", "reason", "signature_algorithm", "message")
COLUMNS = {
    "layers": (
        "name", "found_by", "suspect_name", "k", "bits", "rate", "inverted", "log10_p", "log10_forging_bound",
        "note", "release_rate", "folded",
    ),
}  # fmt: skip


def public(details: Mapping[str, Any]) -> dict[str, Any]:
    """The details a report may hold: :data:`PUBLIC_DETAILS`, the identity cut to :data:`IDENTITY_KEYS`."""
    kept = {k: v for k, v in details.items() if k in PUBLIC_DETAILS}
    if isinstance(kept.get("identity"), Mapping):
        kept["identity"] = {k: v for k, v in kept["identity"].items() if k in IDENTITY_KEYS}
    return kept


def bit_agreement(rows: Sequence[Mapping[str, Any]]) -> Markup:
    """Greedy Residuals: per layer, the share of signature bits the residual signs match, against 50% chance."""
    x0, width, top, step = 200.0, 340.0, 26.0, 26.0
    bottom = top + step * max(len(rows), 1)
    body = axis(x0, width, top - 6, bottom, (0, 0.25, 0.5, 0.75, 1))
    for i, row in enumerate(rows):
        y = top + i * step
        body.append(text(x0 - 8, y + 15, short(str(row.get("name", ""))), anchor="end"))
        rate = finite(row.get("rate"))
        if rate is None:
            body.append(text(x0 + 4, y + 15, "not found in the suspect", fill="#4a5568"))
            continue
        colour = AMBER if row.get("inverted") else BLUE
        body.append(
            f'<rect x="{num(x0)}" y="{num(y + 4)}" width="{num(width * min(max(rate, 0), 1))}" height="16"'
            f' fill="{colour}"/>'
        )
        body.append(text(x0 + width + 8, y + 16, f"{rate:.1%} ({row.get('k')}/{row.get('bits')})"))
    chance = x0 + width * 0.5
    body.append(
        f'<line x1="{num(chance)}" y1="{num(top - 10)}" x2="{num(chance)}" y2="{num(bottom)}" stroke="{RED}"'
        ' stroke-width="2" stroke-dasharray="5,3"/>'
    )
    body.append(text(chance, top - 12, "chance: 50%", anchor="middle", size=11, fill=RED))
    return svg(bottom + 22, "Signature bits matched per layer, against the 50% expected by chance", body)


def figure(entry: Mapping[str, Any]) -> tuple[str, Markup] | None:
    """The bit-agreement chart of a finding with scored layers."""
    layers = entry.get("details", {}).get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(r, Mapping) for r in layers):
        return None
    caption = (
        "Signature bits matched per watermarked layer. Blue: agreement with the owner's code; amber: a negated"
        " layer, whose disagreement counts the same. The red line is chance."
    )
    return caption, bit_agreement(layers)


def _get(payload: Mapping[str, Any], *path: str) -> Any:
    value: Any = payload
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value if isinstance(value, str | int | float | bool) else None


def _fingerprint(pem: Any) -> str | None:
    from auditor import keys
    from auditor.errors import InputError

    try:
        return keys.fingerprint(keys.load_public_key(pem)) if isinstance(pem, str) else None
    except InputError:
        return None


def bundle_summary(payload: Mapping[str, Any]) -> dict[str, Any]:
    """What a report shows of a Greedy Residuals bundle: the copyright statement, the signature algorithm,
    the public key's fingerprint and the watermarked layers' names (never the signature or the key)."""
    layers = payload.get("layers")
    return {
        "identity": {
            "message": _get(payload, "message"), "signature_algorithm": _get(payload, "signature_algorithm"),
            "public_key_sha256": _fingerprint(payload.get("public_key")),
        },
        "layers": [_get(e, "name") for e in layers] if isinstance(layers, list) else [],
    }  # fmt: skip
