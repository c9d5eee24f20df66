"""HufuNet detector: are the owner's EPH kernels where the owner's key says they are?

One finding per owner bundle (scheme ``hufunet``). The host layers the bundle
records are found in the suspect (by name, else kind, shape and order); the
positions are recomputed from the owner's ORIGINAL EPH, key and the host's
kernel count N, never read from the suspect; the kernels there are put back
into HufuNet with the owner's secret piece (SPH) and the result is tested on
the public test split. See docs/hufunet.md for every number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from auditor import hookimpl
from auditor.bases import Detector, Param
from auditor.errors import AuditorError
from auditor.findings import Finding, Verdict
from auditor.graph import LayerGraph
from auditor.plugins.hufunet import report
from auditor.plugins.hufunet.generate import hmac_key, hufunet_from_payload
from auditor.plugins.hufunet.scheme import SCHEME, DataUnavailable, public_dataset
from auditor.report.text import exact_float, power_of_ten
from auditor.toolkit.matching import MISSING, LayerIndex, find_layer, unpack_bundle

if TYPE_CHECKING:  # torch, the network and the placement load when a bundle is checked, not at registration
    import torch

    from auditor.plugins.hufunet.placement import HostView

__all__ = ["DEFAULT_P_THRESHOLD", "TAU_ACC", "DataUnavailable", "HufuNetDetector", "audit_bundle", "public_dataset"]

#: The paper's threshold: ownership holds when DiffAcc = |Acc_original - Acc_combined| / Acc_original < 0.15.
TAU_ACC = 0.15
#: Acc_combined must also be this improbable under chance guessing (a guard for tiny test sets).
DEFAULT_P_THRESHOLD = 1e-6
#: The detector's options (``auditor audit --option hufunet.NAME=VALUE``).
PARAMS = (
    Param(
        "tau_acc",
        TAU_ACC,
        "DiffAcc below which the rebuilt HufuNet counts as the owner's (the paper's tau_acc).",
        float,
        minimum=0.0,
        maximum=1.0,
        open=True,
    ),
    Param(
        "p_threshold",
        DEFAULT_P_THRESHOLD,
        "Binomial p-value against guessing below which the result is conclusive.",
        float,
        minimum=0.0,
        maximum=1.0,
        open=True,
    ),
    Param(
        "public_data",
        None,
        "The folder of the Fashion-MNIST IDX files, if the owner's HufuNet used them.",
        Path,
        aliases=("--public-data",),
    ),
)


def _binomial_tail(correct: int, n: int, classes: int) -> tuple[float | None, float]:
    """P(X >= correct) for X ~ Binomial(n, 1/classes), and its log10, summed exactly in integers:
    sum_{j >= correct} C(n, j) (classes - 1)^(n - j) / classes^n (nothing underflows). The float is ``None``
    where it is below the smallest normal float (a denormal or 0 would pretend to be exact): the log10 is the
    number then."""
    if correct <= 0:
        return 1.0, 0.0
    term = math.comb(n, correct) * (classes - 1) ** (n - correct)
    total = 0
    for j in range(correct, n + 1):
        total += term
        if j < n:  # C(n, j+1) (c-1)^(n-j-1) from C(n, j) (c-1)^(n-j), exact
            term = term * (n - j) // ((j + 1) * (classes - 1)) if classes > 1 else 0
    log10 = math.log10(total) - n * math.log10(classes) if total else -math.inf
    return exact_float(log10), log10


def _host_rows(suspect: LayerGraph, entries: list[Any]) -> tuple[list[dict[str, Any]], list[tuple[str, Any]]]:
    rows: list[dict[str, Any]] = []
    tensors: list[tuple[str, Any]] = []
    index = LayerIndex.of(suspect)
    for entry in entries:
        if not isinstance(entry, Mapping) or not {"name", "param", "kind", "shape", "kernels"} <= set(entry):
            raise ValueError("the hufunet bundle's host layers are malformed")
        match = find_layer(suspect, entry, index)
        row: dict[str, Any] = {
            "name": f"{entry['name']}.{entry['param']}", "found_by": match.found_by, "kernels": int(entry["kernels"]),
            "suspect_name": match.layer.name if match.layer is not None else None, "note": match.note,
        }  # fmt: skip
        rows.append(row)
        if match.layer is not None:
            tensors.append((row["name"], match.layer.params[str(entry["param"])].read(float32=True).contiguous()))
    return rows, tensors


def _inconclusive(finding: Finding, summary: str) -> Finding:
    finding.verdict = Verdict.INCONCLUSIVE
    finding.summary = summary
    return finding


def audit_bundle(suspect: LayerGraph, bundle: Any, settings: Mapping[str, Any]) -> Finding:
    """The finding for one owner bundle (see the module docstring); ``settings`` holds the detector's
    options by name (:data:`PARAMS`; a missing one takes its default)."""
    import torch

    from auditor.plugins.hufunet.network import accuracy, assemble, sph_of
    from auditor.plugins.hufunet.placement import HostView, eph_kernels, place, retrieve

    payload, sha = unpack_bundle(bundle, SCHEME)
    raw_host = payload.get("host")
    host: Mapping[str, Any] = raw_host if isinstance(raw_host, Mapping) else {}
    finding = Finding(
        detector=HufuNetDetector.id, scheme=SCHEME, verdict=Verdict.INCONCLUSIVE, summary="",
        subject=f"{sha[:12]} {host.get('architecture', '')}".strip(),
    )  # fmt: skip
    tau = float(settings.get("tau_acc", TAU_ACC))
    threshold = float(settings.get("p_threshold", DEFAULT_P_THRESHOLD))
    if not 0.0 < tau < 1.0 or not 0.0 < threshold < 1.0:
        raise ValueError("tau_acc and p_threshold must be between 0 and 1")
    section = payload.get("hufunet")
    if not isinstance(section, dict):
        raise ValueError("the hufunet bundle holds no HufuNet section")
    path = getattr(bundle, "path", None)
    net = hufunet_from_payload(section, path)
    key = hmac_key(section, path)
    entries = host.get("layers")
    if not isinstance(entries, list) or not entries:
        raise ValueError("the hufunet bundle records no host layers")
    rows, tensors = _host_rows(suspect, entries)
    finding.details["host_layers"] = rows
    finding.details["notes"] = [f"{r['name']}: {r['note']}" for r in rows if r["note"]]
    finding.metrics = {"tau_acc": tau, "p_threshold": threshold, "host_kernels": int(host.get("kernels", 0))}
    missing = [r for r in rows if r["found_by"] == MISSING]
    if missing:
        resized = any("restore stage" in r["note"] for r in missing)
        names = ", ".join(r["name"] for r in missing)
        return _inconclusive(
            finding,
            f"The owner's host layers {names} could not be found in the suspect"
            + (
                " at the owner's sizes: their channel counts differ, so the keyed positions would point at other"
                " weights and the HufuNet was not read; audit with the owner's reference model (--reference) so the"
                " restore stage can align the channels first."
                if resized
                else ", so the HufuNet could not be read."
            ),
        )
    view = HostView.from_tensors(tensors)
    if view.n != finding.metrics["host_kernels"]:
        return _inconclusive(
            finding,
            f"The suspect's host layers hold {view.n} kernels where the owner's bundle records"
            f" {finding.metrics['host_kernels']}, so the keyed positions cannot be recomputed for it.",
        )
    eph = eph_kernels([conv.weight for conv in net.conv_layers()])
    positions = place(eph, key, view.n)
    del key
    found = retrieve(view, positions)
    same = found.view(torch.int32) == eph.view(torch.int32)
    finite = torch.isfinite(found)
    combined = assemble(torch.where(finite, found, torch.zeros_like(found)), sph_of(net), net.widths, net.in_channels)
    _per_layer(rows, view, positions, same)
    finding.metrics.update(
        kernels=int(eph.shape[0]), eph_fraction=eph.shape[0] / view.n,
        bit_identical_fraction=float(same.float().mean()),
        kernels_identical_fraction=float(same.reshape(-1, 9).all(dim=1).float().mean()),
        non_finite_weights=int((~finite).sum()),
    )  # fmt: skip
    try:
        data = public_dataset(section["dataset"], settings.get("public_data"))
    except (DataUnavailable, AuditorError) as exc:
        return _inconclusive(finding, f"The HufuNet's public test split is not available, so it was not tested: {exc}.")
    acc_original = float(section["acc_original"])
    acc_combined = accuracy(combined, data)
    n = len(data.test)
    classes = int(section["num_classes"])
    chance = 1.0 / classes
    correct = round(acc_combined * n)
    p, log10_p = _binomial_tail(correct, n, classes)
    diff = abs(acc_original - acc_combined) / acc_original if acc_original > 0 else math.inf
    finding.metrics.update(
        acc_original=acc_original, acc_original_measured=accuracy(net, data), acc_combined=acc_combined,
        diff_acc=diff, test_size=n, correct=correct, chance=chance, binomial_p=p, log10_binomial_p=log10_p,
    )  # fmt: skip
    if diff >= tau:
        finding.verdict = Verdict.NOT_DETECTED
    elif log10_p < math.log10(threshold):
        finding.verdict = Verdict.DETECTED
    finding.summary = _summary(finding.verdict, finding.metrics)
    return finding


def _per_layer(rows: list[dict[str, Any]], view: HostView, positions: list[int], same: torch.Tensor) -> None:
    """How many EPH kernels each host layer carries and how many of them came back bit-identical."""
    identical = same.reshape(len(positions), -1).all(dim=1).tolist()
    here: dict[str, list[bool]] = {}
    for pos, ok in zip(positions, identical, strict=True):
        here.setdefault(view.key(pos), []).append(bool(ok))
    for row in rows:
        hits = here.get(row["name"], [])
        row.update(eph_kernels_here=len(hits), bit_identical_kernels=sum(hits))


def _chance_words(m: Mapping[str, Any]) -> str:
    """What the binomial p-value means: no more correct answers than guessing gives, or how rarely guessing
    gets this many right (a power of ten when tiny, never 0)."""
    p = power_of_ten(m["log10_binomial_p"])
    if m["log10_binomial_p"] >= math.log10(report.NO_EVIDENCE_P):
        return (
            f"guessing would get {m['chance']:.0%} right, and {m['correct']} correct answers are no more than guessing"
            f" gives: no evidence against chance (p-value {p})"
        )
    return f"guessing would get {m['chance']:.0%} right, and {m['correct']} or more correct answers by chance has" + (
        f" probability {p}"
    )


def _summary(verdict: Verdict, m: Mapping[str, Any]) -> str:
    rebuilt = (
        f"the kernels at the owner's keyed positions, put back together with the owner's secret piece, classify"
        f" {m['acc_combined']:.2%} of the {m['test_size']} public test images correctly (the owner's HufuNet:"
        f" {m['acc_original']:.2%}; DiffAcc {m['diff_acc']:.3f} against the threshold {m['tau_acc']:g})"
    )
    tail = (
        f"; {_chance_words(m)}. {m['bit_identical_fraction']:.2%} of the EPH weights read are bit-identical to the"
        " owner's: not the deciding number, since fine-tuning, or a restore stage that realigns and rescales"
        " weights, changes their last bits without removing the network."
    )
    if verdict is Verdict.DETECTED:
        return f"The owner's HufuNet was found: {rebuilt}{tail}"
    if verdict is Verdict.NOT_DETECTED:
        return f"The owner's HufuNet was not found: {rebuilt}{tail}"
    return f"The result is inconclusive: {rebuilt}, but the test set is too small to rule out chance{tail}"


class HufuNetDetector(Detector):
    """Checks owner bundles of scheme ``hufunet`` against a suspect."""

    id = "hufunet"
    scheme = SCHEME
    description = "HufuNet (Lv et al., 2023): the owner's secret network rebuilt from keyed kernel positions."
    title = "HufuNet"
    measure = ("acc_combined", "Acc_combined")
    p_metric = "log10_binomial_p"
    table_metrics: ClassVar[dict[str, str]] = {"diff_acc": "diff_acc", "bit_identical": "bit_identical_fraction"}
    explanation = report.EXPLANATION
    null_hypothesis = report.NULL_HYPOTHESIS
    limitations = report.LIMITATIONS
    metric_labels = report.METRIC_LABELS
    percent_metrics = report.PERCENT
    public_details = report.PUBLIC_DETAILS
    columns = report.COLUMNS
    params = PARAMS

    def detect(self, suspect: LayerGraph, *, bundle: Any | None, context: Mapping[str, Any]) -> list[Finding]:
        """One finding for ``bundle`` (see :func:`audit_bundle`)."""
        if bundle is None:
            raise ValueError("the hufunet detector needs an owner bundle")
        return [audit_bundle(suspect, bundle, self.settings(context))]

    def shipped_calibration(self, payload: Mapping[str, Any]) -> Path | None:
        """The calibration shipped for the built-in architecture the bundle names (calibration/)."""
        from auditor.plugins.hufunet.calibration import shipped

        return shipped(payload)

    def figure(self, entry: Mapping[str, Any]) -> tuple[str, Any] | None:
        """The accuracy chart."""
        return report.figure(entry)

    def validate_bundle(self, payload: Mapping[str, Any]) -> None:
        """The payload's schema (:func:`auditor.plugins.hufunet.bundle.validate_payload`)."""
        from auditor.plugins.hufunet.bundle import validate_payload

        validate_payload(payload)

    def bundle_summary(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The host architecture the bundle names."""
        return report.bundle_summary(payload)

    def first_screen(self, entry: Mapping[str, Any], bundle_entry: Mapping[str, Any] | None) -> dict[str, Any]:
        """The holder of the secret bundle as the claimant, the rebuilt network's accuracy and the binomial tail."""
        return report.first_screen(entry, bundle_entry)

    def describes(self, payload: Mapping[str, Any], graph: LayerGraph) -> str | None:
        """Whether every host layer the bundle records has a counterpart of its kind and shape in ``graph``."""
        return report.describes(payload, graph)


@hookimpl
def register_detectors(register: Any) -> None:
    """Register the HufuNet detector."""
    register(HufuNetDetector())
