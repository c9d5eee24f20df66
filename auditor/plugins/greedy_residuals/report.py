"""How Greedy Residuals findings are shown: the explanation, metric labels (deciding number first),
the public details, table columns, the bit-agreement figure and the bundle summary."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from auditor.report.text import power_of_ten
from auditor.toolkit.figures import AMBER, BLUE, axis, finite, num, short, svg, text

if TYPE_CHECKING:
    from auditor.graph import LayerGraph

__all__ = [
    "COLUMNS",
    "EXPLANATION",
    "LIMITATIONS",
    "METRIC_LABELS",
    "NULL_HYPOTHESIS",
    "PUBLIC_DETAILS",
    "bit_agreement",
    "bundle_summary",
    "chance_words",
    "describes",
    "figure",
    "first_screen",
]

#: The chance line: neutral ink, dashed (no colour reads as guilty or innocent).
CHANCE = "#1a202c"

EXPLANATION = (
    "Greedy Residuals hides a 256-bit code in the signs of averaged weights (the residuals) of a few chosen"
    " layers; the code is derived from the owner's digital signature on the copyright statement, and the"
    " audit first checks that this signature verifies under the public key in the owner's bundle. For each"
    " layer the audit counts how many residual signs agree with the code. A model that never carried the"
    " watermark agrees on about half of them, as coin flips would (the 50% line in the picture). The"
    " p-value is the probability that chance alone gives an agreement at least this far from half, corrected"
    " for the number of layers tried (computed exactly, in log space: a p-value too small for a floating-point"
    " number is written as a power of ten, never as 0); the verdict is 'found' only when it is below the"
    " threshold shown. The"
    " forging bound is the paper's estimate of how likely a forger's random signature would fit as well."
    " What this does not prove: who owns the public key (that needs outside evidence, such as a dated"
    " publication of the key or the signed statement), when or by whom the suspect was copied, or that the"
    " owner did not train the suspect themselves. 'Not found' does not prove independence: heavy retraining,"
    " distillation or edits the restore stage did not undo can erase the code."
)

#: The null hypothesis the p-value is computed under.
NULL_HYPOTHESIS = (
    "The suspect never carried this watermark: its residual signs are fair coin flips, independent of the"
    " owner's signature bits, so each bit matches with probability 1/2 (the number of matches is binomial)."
)
#: What a finding does not prove, for the report's first screen.
LIMITATIONS = (
    "Who holds the signing key (that needs outside evidence, such as a dated publication of the key or of the"
    " signed statement); when, how or by whom the suspect was copied; that the owner did not train it"
    " themselves. 'Not found' does not prove independence: retraining, distillation or edits the restore stage"
    " did not undo can erase the code."
)
#: At or above this p-value the match count is what coin flips give: no evidence against chance.
NO_EVIDENCE_P = 0.05

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
        f'<line x1="{num(chance)}" y1="{num(top - 10)}" x2="{num(chance)}" y2="{num(bottom)}" stroke="{CHANCE}"'
        ' stroke-width="2" stroke-dasharray="5,3"/>'
    )
    body.append(text(chance, top - 12, "chance: 50%", anchor="middle", size=11, fill=CHANCE))
    return svg(bottom + 22, "Signature bits matched per layer, against the 50% expected by chance", body)


def figure(entry: Mapping[str, Any]) -> tuple[str, Markup] | None:
    """The bit-agreement chart of a finding with scored layers."""
    layers = entry.get("details", {}).get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(r, Mapping) for r in layers):
        return None
    caption = (
        "Signature bits matched per watermarked layer. Blue: agreement with the owner's code; amber: a negated"
        " layer, whose disagreement counts the same. The dashed line is chance."
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


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def chance_words(log10_p: float, threshold: float | None = None, tried: str = "") -> str:
    """What a combined p-value means, to follow a count of matching bits: about what coin flips give (no
    evidence against chance), some evidence short of the threshold, or how rarely chance matches this well
    (a power of ten when tiny, never 0). ``tried`` qualifies the p-value ("after allowing for 3 layers")."""
    p = power_of_ten(log10_p)
    if log10_p >= math.log10(NO_EVIDENCE_P):
        return f"about as many as coin flips would give: no evidence against chance (p-value {p}{tried})"
    if threshold is not None and log10_p >= math.log10(threshold):
        return (
            f"which chance gives with probability {p}{tried}: some evidence against chance, short of the"
            f" threshold {threshold:g}"
        )
    return f"which chance gives with probability {p}{tried}"


def first_screen(entry: Mapping[str, Any], bundle_entry: Mapping[str, Any] | None) -> dict[str, Any]:
    """The first screen of a Greedy Residuals finding: the signed copyright statement in full and whether its
    signature verified; the best layer's matching bits and the Bonferroni-corrected p-value."""
    identity = _mapping(_mapping(entry.get("details")).get("identity"))
    recorded = _mapping(_mapping(bundle_entry).get("identity"))
    metrics = _mapping(entry.get("metrics"))
    message = identity.get("message") or recorded.get("message")
    algorithm = identity.get("signature_algorithm") or recorded.get("signature_algorithm") or "the bundle's"
    fingerprint = recorded.get("public_key_sha256")
    key = f"the {algorithm} key" + (f" whose SHA-256 fingerprint is {fingerprint}" if fingerprint else "")
    verified = identity.get("verified", metrics.get("identity_verified"))
    if verified is True:
        basis = (
            f"The owner's signed copyright statement: its signature verifies under {key}, and the watermark bits"
            " are derived from that signature. Who holds the key needs outside evidence."
        )
    else:
        reason = identity.get("reason") or "it was not checked"
        basis = f"The signature on this statement does not verify ({reason}), so the bundle proves no owner."
    screen: dict[str, Any] = {
        "owner": f"“{message}”" if isinstance(message, str) else "no copyright statement in the bundle",
        "owner_basis": basis, "null_hypothesis": NULL_HYPOTHESIS, "not_proven": LIMITATIONS,
        "log10_p": metrics.get("log10_combined_p"),
    }  # fmt: skip
    k, bits, layer, tried = (metrics.get(n) for n in ("best_k", "bits", "best_layer", "layers_tried"))
    log10_p = metrics.get("log10_combined_p")
    if not (isinstance(k, int) and isinstance(bits, int) and isinstance(log10_p, int | float)):
        screen["statistic"] = str(entry.get("summary", ""))
        return screen
    others = f", the best of {tried} layers" if isinstance(tried, int) and tried > 1 else ""
    if entry.get("verdict") == "detected" and 2 * k < bits:
        count = f"{bits - k} of {bits} signature bits match with every sign flipped in layer {layer} (a negated layer)"
    else:
        count = f"{k} of {bits} signature bits match in layer {layer}"
    chance = ", about as many as coin flips would give: no evidence against chance"
    screen["statistic"] = count + others + (chance if log10_p >= math.log10(NO_EVIDENCE_P) else "")
    screen["p_label"] = "two-sided binomial p-value" + (
        f", Bonferroni-corrected for {tried} layers" if isinstance(tried, int) and tried > 1 else ""
    )
    return screen


def describes(payload: Mapping[str, Any], graph: LayerGraph) -> str | None:
    """Why the bundle does not describe ``graph`` (a layer it watermarked has no counterpart of that kind and
    shape), or ``None`` when every watermarked layer is found."""
    from auditor.toolkit.matching import missing_layer

    return missing_layer(
        graph,
        payload.get("layers"),
        none="the bundle names no watermarked layer to compare it with",
        malformed="the bundle's watermarked layers are malformed",
        like="the watermarked {name}",
    )
