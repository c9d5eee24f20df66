"""Greedy Residuals detector: is the owner's signature in the suspect's residual signs?

One finding per owner bundle. The bundle's identity is checked first (the
signature must verify under the public key for the message, and the
signature bits are recomputed from the signature, never read from the
bundle); then each watermarked layer is looked up in the suspect, its
residual signs compared with the signature bits, and the matches turned into
a two-sided binomial p-value and the paper's forging bound. See
docs/greedy_residuals_detection.md for every number.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from auditor import hookimpl
from auditor.bases import Detector, Param
from auditor.findings import Finding, Verdict
from auditor.graph import Layer, LayerGraph, LayerKind
from auditor.plugins.greedy_residuals import report, stats
from auditor.plugins.greedy_residuals.scheme import SCHEME, GRParams, alpha_from_signature, match_bits, residuals
from auditor.toolkit.matching import MISSING, LayerIndex, LayerMatch, find_layer, unpack_bundle

if TYPE_CHECKING:  # numpy and torch load when a bundle is checked, not when the detector registers
    import torch

__all__ = ["DEFAULT_P_THRESHOLD", "GreedyResidualsDetector", "Identity", "LayerMatch", "find_layer", "forging_check"]

#: Combined p-value below which the signature counts as found (option ``p_threshold``).
DEFAULT_P_THRESHOLD = 1e-6
#: The detector's options (``auditor audit --option greedy-residuals.NAME=VALUE``).
PARAMS = (
    Param(
        "p_threshold",
        DEFAULT_P_THRESHOLD,
        "Combined p-value below which the watermark counts as found.",
        float,
        minimum=0.0,
        maximum=1.0,
        open=True,
        aliases=("--p-threshold",),
    ),
    Param("forging_check", False, "Also score random forged signatures against the suspect (section 5.4).", bool),
    Param("forging_check_n", 200, "How many forged signatures the forging check tries.", int, minimum=1),
)
#: Layer kinds an adversary could read residuals from (M in the forging bound).
SCORABLE_KINDS = (LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.LINEAR, LayerKind.LSTM, LayerKind.GRU)
_CONV_KINDS = (LayerKind.CONV1D, LayerKind.CONV2D)


@dataclass(frozen=True)
class Identity:
    """Whether the bundle binds its signature bits to its public key.

    ``signature`` is private to the code (it is never put into text)."""

    verified: bool
    reason: str
    algorithm: str = ""
    signature: bytes = b""


def verify_identity(payload: Mapping[str, Any]) -> Identity:
    """Check that the payload's signature verifies under its public key for its message."""
    from auditor import keys  # the cryptography import is paid on first use only

    message, sig_b64, pem = payload.get("message"), payload.get("signature"), payload.get("public_key")
    if not isinstance(message, str) or not isinstance(sig_b64, str) or not isinstance(pem, str):
        return Identity(False, "the bundle lacks its message, signature or public key")
    try:
        signature = base64.b64decode(sig_b64, validate=True)
    except (binascii.Error, ValueError):
        return Identity(False, "the bundle's signature is not valid base64")
    try:
        key = keys.load_public_key(pem)
    except Exception:  # whatever the key parser raises, the bundle binds nothing
        return Identity(False, "the bundle's public key cannot be read")
    algorithm = keys.signature_algorithm(key)
    claimed = payload.get("signature_algorithm")
    if claimed is not None and claimed != algorithm:
        return Identity(False, f"the bundle names algorithm {claimed!r} but its public key is {algorithm!r}")
    if not keys.verify(key, signature, message.encode("utf-8")):
        return Identity(False, "the signature does not verify under the public key for the message")
    return Identity(True, "the signature verifies under the public key for the message", algorithm, signature)


def _looks_folded(suspect: LayerGraph, layer: Layer, entry: Mapping[str, Any]) -> bool:
    """A convolution with a bias and no batch-norm after it, where the owner's had one.

    A bundle layer may say whether a batch-norm followed it (``batch_norm``); where
    it does not, a suspect with no batch-norm layer at all is taken as folded."""
    if layer.kind not in _CONV_KINDS or "bias" not in layer.params:
        return False
    consumers = [suspect.layer(e.dst) for e in suspect.consumers(layer.name) if e.dst in suspect]
    if any(c.kind is LayerKind.BATCH_NORM for c in consumers):
        return False
    owner_had_bn = entry.get("batch_norm")
    if owner_had_bn is not None:
        return bool(owner_had_bn)
    return not suspect.of_kind(LayerKind.BATCH_NORM)


_ROW_KEYS = (
    "name", "kind", "found_by", "suspect_name", "k", "bits", "rate", "detection_rate", "inverted", "p_value",
    "log10_p", "forging_bound", "log10_forging_bound", "release_rate", "rate_shift", "folded", "note",
)  # fmt: skip


def _score(
    suspect: LayerGraph, entry: Mapping[str, Any], match: LayerMatch, *, alpha: torch.Tensor, params: GRParams, m: int
) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(_ROW_KEYS)
    row.update(name=str(entry["name"]), kind=str(entry["kind"]), found_by=match.found_by, note=match.note)
    release = entry.get("release_rate")
    if match.layer is None:
        return row
    row["suspect_name"] = match.layer.name
    weight = match.layer.params[str(entry.get("param", "weight"))].read(float32=True)
    k = match_bits(residuals(weight.detach(), params), alpha)
    b = params.bits
    p = stats.two_sided_p(k, b)
    bound = stats.forging_bound(k, b, layers=m, cells=params.cells)
    rate = k / b
    row.update(
        k=k, bits=b, rate=rate, detection_rate=max(k, b - k) / b, inverted=rate < 0.5,
        p_value=p.value, log10_p=p.log10, forging_bound=bound.value, log10_forging_bound=bound.log10,
        release_rate=float(release) if isinstance(release, (int, float)) else None,
        rate_shift=rate - float(release) if isinstance(release, (int, float)) else None,
        folded=_looks_folded(suspect, match.layer, entry),
    )  # fmt: skip
    notes = [match.note] if match.note else []
    if row["folded"]:
        shift = "" if row["rate_shift"] is None else f": folding moved the rate by {row['rate_shift']:+.4f}"
        notes.append(f"looks batch-norm-folded (a bias and no batch-norm after it){shift}")
    if row["inverted"]:
        notes.append("inverted: the layer was negated, which leaves the model working the same; it still counts")
    row["note"] = "; ".join(notes)
    return row


def forging_check(suspect: LayerGraph, bundle: Any, n: int = 200, seed: int = 0) -> list[float]:
    """Paper Table 6: the match rates of ``n`` random signatures (random bytes hashed to
    bits exactly like the owner's) on the bundle's layers found in the suspect,
    averaged over those layers; an honest scheme gives rates around 0.5."""
    import numpy as np
    import torch

    payload, _ = unpack_bundle(bundle, "greedy-residuals")
    params = GRParams.from_dict(payload.get("params", {}))
    rng = np.random.default_rng(seed)
    alphas = torch.stack([alpha_from_signature(rng.bytes(64), params.bits) for _ in range(n)])
    totals = torch.zeros(n)
    found = 0
    index = LayerIndex.of(suspect)
    for entry in payload.get("layers", []):
        match = find_layer(suspect, entry, index)
        if match.layer is None:
            continue
        weight = match.layer.params[str(entry.get("param", "weight"))].read(float32=True)
        signs = torch.sign(residuals(weight.detach(), params))
        totals += (signs.unsqueeze(0) == alphas).sum(dim=1).to(torch.float32) / params.bits
        found += 1
    return [] if found == 0 else [float(r) for r in totals / found]


def _statement(message: Any) -> str:
    """The copyright statement on one line and whole: a report never cuts the owner's words."""
    return " ".join(str(message or "").split())


def _summary(verdict: Verdict, scored: list[dict[str, Any]], combined: stats.Probability, threshold: float) -> str:
    best = min(scored, key=lambda r: r["log10_p"])
    where = (
        best["name"] if best["suspect_name"] == best["name"] else f"{best['name']} (found as {best['suspect_name']})"
    )
    tried = f" after allowing for {len(scored)} layers tried" if len(scored) > 1 else ""
    # Below the threshold a rate under 0.5 is chance, not a negated layer: tell that story only for a detection.
    if best["inverted"] and verdict is Verdict.DETECTED:
        count = (
            f"{best['bits'] - best['k']} of {best['bits']} signature bits are inverted, because the layer was negated"
            " (the model works the same, so it still counts)"
        )
    else:
        count = f"{best['k']} of {best['bits']} signature bits match"
    if verdict is Verdict.DETECTED:
        return (
            f"The suspect carries the owner's signature: in layer {where}, {count}; a match this strong happens"
            f" by chance with probability {combined.words()}{tried}."
        )
    return (
        f"The suspect does not show the owner's signature: in its best layer, {where}, {count},"
        f" {report.chance_words(combined.log10, threshold, tried)}."
    )


def audit_bundle(suspect: LayerGraph, bundle: Any, settings: Mapping[str, Any]) -> Finding:
    """The finding for one owner bundle (see the module docstring); ``settings`` holds the detector's
    options by name (:data:`PARAMS`; a missing one takes its default)."""
    payload, sha = unpack_bundle(bundle, "greedy-residuals")
    message = payload.get("message")
    finding = Finding(
        detector=GreedyResidualsDetector.id, scheme=SCHEME, verdict=Verdict.INCONCLUSIVE, summary="",
        subject=f"{sha[:12]} {_statement(message)}".strip(),
    )  # fmt: skip
    threshold = float(settings.get("p_threshold", DEFAULT_P_THRESHOLD))
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"p_threshold must be between 0 and 1, not {threshold}")
    params = GRParams.from_dict(payload.get("params", {}))
    pem = payload.get("public_key")
    identity = verify_identity(payload)
    finding.details["identity"] = {
        "verified": identity.verified, "reason": identity.reason, "signature_algorithm": identity.algorithm,
        "message": str(message), "public_key": str(pem),
        "public_key_sha256": hashlib.sha256(str(pem).strip().encode()).hexdigest(),
    }  # fmt: skip
    finding.details["params"] = params.to_dict()
    finding.metrics = {"identity_verified": identity.verified, "p_threshold": threshold}
    if not identity.verified:
        finding.summary = (
            "The owner bundle does not bind the signature bits to the owner: "
            f"{identity.reason}, so it supports no ownership claim."
        )
        return finding
    stored_kept = payload.get("params", {}).get("kept_per_row")
    if stored_kept is not None and stored_kept != params.kept_per_row:
        finding.details["params_note"] = f"the bundle records kept_per_row={stored_kept}; {params.kept_per_row} is used"
    alpha = alpha_from_signature(identity.signature, params.bits)  # recomputed, never read from the bundle
    m = len(suspect.of_kind(*SCORABLE_KINDS))
    index = LayerIndex.of(suspect)
    rows = [
        _score(suspect, entry, find_layer(suspect, entry, index), alpha=alpha, params=params, m=m)
        for entry in payload["layers"]
    ]
    finding.details["layers"] = rows
    finding.details["notes"] = [f"{r['name']}: {r['note']}" for r in rows if r["note"]]
    scored = [r for r in rows if r["found_by"] != MISSING]
    finding.metrics.update(layers_tried=len(scored), layers_missing=len(rows) - len(scored), suspect_layers_m=m)
    if settings.get("forging_check"):
        import numpy as np

        rates = forging_check(suspect, bundle, n=int(settings.get("forging_check_n", 200)))
        finding.details["forging_check"] = {
            "signatures": len(rates), "mean_rate": float(np.mean(rates)) if rates else None,
            "min_rate": min(rates, default=None), "max_rate": max(rates, default=None),
        }  # fmt: skip
    if not scored:
        names = ", ".join(r["name"] for r in rows)
        restore = any("restore stage" in r["note"] for r in rows)
        finding.summary = f"None of the owner's watermarked layers ({names}) could be found in the suspect, so the" + (
            " signature could not be checked: their channel counts differ, so run the restore stage against the"
            " owner's reference model first." if restore else " signature could not be checked."
        )  # fmt: skip
        return finding
    combined = stats.bonferroni([r["log10_p"] for r in scored])
    fisher = stats.fisher([r["log10_p"] for r in scored])
    best = min(scored, key=lambda r: r["log10_p"])
    finding.verdict = Verdict.DETECTED if combined.log10 < math.log10(threshold) else Verdict.NOT_DETECTED
    finding.metrics.update(
        combined_p=combined.value, log10_combined_p=combined.log10, fisher_p=fisher.value,
        log10_fisher_p=fisher.log10, best_layer=best["name"], best_k=best["k"], bits=params.bits,
        best_rate=best["rate"], best_detection_rate=best["detection_rate"],
        min_forging_bound=best["forging_bound"], log10_min_forging_bound=best["log10_forging_bound"],
    )  # fmt: skip
    finding.summary = _summary(finding.verdict, scored, combined, threshold)
    return finding


class GreedyResidualsDetector(Detector):
    """Checks owner bundles of scheme ``greedy-residuals`` against a suspect."""

    id = "greedy-residuals"
    scheme = SCHEME
    description = "Greedy Residuals (ICML 2021): owner's signature bits in the signs of weight residuals."
    title = "Greedy Residuals"
    short_title = "GR"
    measure = ("best_detection_rate", "detection rate")
    p_metric = "log10_combined_p"
    table_metrics: ClassVar[dict[str, str]] = {"layers_missing": "layers_missing"}
    explanation = report.EXPLANATION
    null_hypothesis = report.NULL_HYPOTHESIS
    limitations = report.LIMITATIONS
    metric_labels = report.METRIC_LABELS
    public_details = report.PUBLIC_DETAILS
    columns = report.COLUMNS
    params = PARAMS

    def detect(self, suspect: LayerGraph, *, bundle: Any | None, context: Mapping[str, Any]) -> list[Finding]:
        """One finding for ``bundle`` (see :func:`audit_bundle`)."""
        if bundle is None:
            raise ValueError("the greedy-residuals detector needs an owner bundle")
        return [audit_bundle(suspect, bundle, self.settings(context))]

    def shipped_calibration(self, payload: Mapping[str, Any]) -> Path | None:
        """The calibration shipped for the built-in architecture the bundle names (calibration/)."""
        from auditor.plugins.greedy_residuals.calibration import shipped

        return shipped(payload)

    def public(self, details: Mapping[str, Any]) -> dict[str, Any]:
        """The public details: the identity block cut to the statement, algorithm and verification."""
        return report.public(details)

    def figure(self, entry: Mapping[str, Any]) -> tuple[str, Any] | None:
        """The bit-agreement chart."""
        return report.figure(entry)

    def validate_bundle(self, payload: Mapping[str, Any]) -> None:
        """The payload's schema (:func:`auditor.plugins.greedy_residuals.bundle.validate_payload`)."""
        from auditor.plugins.greedy_residuals.bundle import validate_payload

        validate_payload(payload)

    def bundle_summary(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The statement, signature algorithm, key fingerprint and watermarked layers of the bundle."""
        return report.bundle_summary(payload)

    def first_screen(self, entry: Mapping[str, Any], bundle_entry: Mapping[str, Any] | None) -> dict[str, Any]:
        """The signed statement in full, whether its signature verified, the best layer's bits and the p-value."""
        return report.first_screen(entry, bundle_entry)

    def describes(self, payload: Mapping[str, Any], graph: LayerGraph) -> str | None:
        """Whether every watermarked layer the bundle names has a counterpart in ``graph``."""
        return report.describes(payload, graph)


@hookimpl
def register_detectors(register: Any) -> None:
    """Register the Greedy Residuals detector."""
    register(GreedyResidualsDetector())
