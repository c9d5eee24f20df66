"""Ambiguity attacks: an adversary tries to read a watermark of their own out of the stolen model.

Neither changes the model (the file is written back unchanged, so the attack
fits the grid like any other); the summary says whether the forgery would
support a claim. Greedy Residuals (paper 000, Table 6): random signatures
matched against the residual signs of the bundle's layers. HufuNet (paper
002, section 5.7): "first correlation then accuracy" (keys tried against the
placement correlation, a HufuNet built from the kernels they tie) and "first
accuracy then correlation" (the adversary's own HufuNet's kernels searched for
in the model within +-n%, Table 8).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from auditor.errors import UsageError
from auditor.toolkit.attack import BuiltinAttack, Param
from auditor.toolkit.modelio import read_model, save

__all__ = ["MATCH_RANGES", "ForgeGreedyResiduals", "ForgeHufuNet", "closest_kernels"]

#: The +-n% ranges of the HufuNet paper's Table 8.
MATCH_RANGES = (0.25, 0.50, 0.75, 0.80, 0.90)


class ForgeGreedyResiduals(BuiltinAttack):
    """Random signatures read against the watermarked layers: how close does a forgery come?"""

    id = "forge-gr"
    function_preserving = True
    description = "Greedy Residuals forging: match rates of random signatures on the owner's layers (model unchanged)."
    paper = "GR Table 6 and Fig. 5 (200 random signatures: rates near 50%)"
    params = (
        Param("bundle", None, "The owner's Greedy Residuals bundle: which layers to read (required)."),
        Param("signatures", 200, "Random signatures to try.", int),
        Param("p_threshold", 1e-6, "The detector's threshold a forgery would have to pass.", float),
    )

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Try the signatures, write the model back unchanged."""
        from auditor.bundle import load_bundle
        from auditor.plugins.greedy_residuals import stats
        from auditor.plugins.greedy_residuals.detector import forging_check
        from auditor.plugins.greedy_residuals.scheme import GRParams

        if not options["bundle"]:
            raise UsageError("forge-gr needs the owner's bundle (option bundle): it names the layers to read")
        bundle = load_bundle(Path(options["bundle"]))
        source = read_model(model)
        rates = forging_check(source.graph, bundle, n=options["signatures"], seed=options["seed"])
        save(source, source.tensors, out, model_factory=options["model_factory"])
        if not rates:
            return {"signatures": 0, "note": "none of the bundle's layers was found in the model"}
        bits = GRParams.from_dict(bundle.payload.get("params", {})).bits
        best = max(rates, key=lambda r: abs(r - 0.5))
        p = stats.two_sided_p(round(best * bits), bits)
        return {
            "signatures": len(rates), "mean_rate": sum(rates) / len(rates), "min_rate": min(rates),
            "max_rate": max(rates), "best_log10_p": p.log10,
            "claims": sum(stats.two_sided_p(round(r * bits), bits).log10 < math.log10(options["p_threshold"])
                          for r in rates),
        }  # fmt: skip


def closest_kernels(
    eph: torch.Tensor, host: torch.Tensor, *, small: float, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """For each EPH kernel (rows of ``eph``, 9 values), the host kernel (rows of ``host``) with the smallest
    largest relative deviation over the EPH values with ``|v| >= small``, and that deviation."""
    best_dev = torch.empty(len(eph))
    best_idx = torch.empty(len(eph), dtype=torch.long)
    for start in range(0, len(eph), chunk):
        e = eph[start : start + chunk]
        big = e.abs() >= small
        rel = (host[None, :, :] - e[:, None, :]).abs() / e.abs().clamp_min(1e-12)[:, None, :]
        dev = torch.where(big[:, None, :], rel, torch.zeros_like(rel)).amax(dim=2)
        best_dev[start : start + chunk], best_idx[start : start + chunk] = dev.min(dim=1)
    return best_idx, best_dev


class ForgeHufuNet(BuiltinAttack):
    """The two forging attacks of the HufuNet paper against the stolen model's 3x3 kernels."""

    id = "forge-hufunet"
    function_preserving = True
    description = "HufuNet forging: keys tried for the placement correlation, or own kernels searched (unchanged)."
    paper = "HufuNet section 5.7 and Table 8"
    params = (
        Param(
            "method",
            "correlation",
            "correlation: 'first correlation then accuracy'; accuracy: 'first accuracy then correlation'.",
            choices=("correlation", "accuracy"),
        ),
        Param("keys", 100, "Random keys to try (correlation).", int),
        Param("epochs", 10, "Epochs to train the forged fully connected layer (correlation).", int),
    )

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Forge, write the model back unchanged."""
        from auditor.plugins.hufunet.detector import TAU_ACC
        from auditor.plugins.hufunet.generate import MIN_DIGITS_ACCURACY
        from auditor.plugins.hufunet.placement import HostView
        from auditor.toolkit import data as datasets

        source = read_model(model)
        try:
            view = HostView.from_graph(source.graph)
        except (UsageError, ValueError) as exc:
            raise UsageError(f"{model}: no host kernels to forge from: {exc}") from None
        data = datasets.digits()
        if options["method"] == "correlation":
            summary = self._correlation(view, data, options)
        else:
            summary = self._accuracy(view, data, options)
        save(source, source.tensors, out, model_factory=options["model_factory"])
        # A claim needs the forged HufuNet within tau of an accuracy a real HufuNet reaches.
        reference = summary.pop("reference_accuracy", MIN_DIGITS_ACCURACY)
        summary["claim"] = bool(summary["accuracy"] >= (1 - TAU_ACC) * reference)
        return {"method": options["method"], "host_kernels": view.n, **summary}

    def _correlation(self, view: Any, data: Any, options: dict[str, Any]) -> dict[str, Any]:
        from auditor.plugins.hufunet.forging import forge
        from auditor.plugins.hufunet.network import DIGITS_WIDTHS

        tries = forge(view, widths=DIGITS_WIDTHS, data=data, keys=options["keys"], seed=options["seed"],
                      epochs=options["epochs"])  # fmt: skip
        best = max(tries, key=lambda f: f.correlated)
        return {"keys": len(tries), "max_correlated_kernels": best.correlated, "accuracy": best.accuracy}

    def _accuracy(self, view: Any, data: Any, options: dict[str, Any]) -> dict[str, Any]:
        from auditor.plugins.hufunet.generate import generate_hufunet, load_hufunet
        from auditor.plugins.hufunet.network import accuracy, assemble, eph_of, sph_of
        from auditor.plugins.hufunet.placement import eph_kernels

        with tempfile.TemporaryDirectory(prefix="auditor-forger-") as tmp:
            generate_hufunet(out=Path(tmp) / "forger.json", seed=options["seed"] + 1)
            net, secret = load_hufunet(Path(tmp) / "forger.json")
        eph = eph_kernels(eph_of(net)).reshape(-1, 9)
        host = torch.stack([view.read(j).reshape(9) for j in range(view.n)])
        # The paper ignores the smallest values (below the 10% pruning threshold): nothing matches them.
        small = float(torch.quantile(eph.abs().flatten(), 0.10))
        index, deviation = closest_kernels(eph, host, small=small)
        found = {f"{n:.0%}": float((deviation <= n).float().mean()) for n in MATCH_RANGES}
        forged = assemble(host[index].reshape(-1, 3, 3), sph_of(net), net.widths, net.in_channels)
        return {"eph_kernels": len(eph), "found": found, "accuracy": accuracy(forged, data),
                "reference_accuracy": float(secret["acc_original"])}  # fmt: skip
