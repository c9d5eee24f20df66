"""Attacks on Greedy Residuals: forging a signature of one's own, and overwriting with one.

Forging (its paper, Table 6) reads random signatures against the residual
signs of the bundle's layers; the model is written back unchanged, so the
attack fits the evaluation grid like any other, and the summary says whether a
forgery would support a claim. Overwriting (Table 7) embeds the adversary's
own signature into the stolen model, training with the thief's data or, without
any, on noise images labelled by the stolen model. Importing this module
imports no torch: each attack loads what it needs when it runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor import hookimpl
from auditor.bases import Attack
from auditor.errors import UsageError
from auditor.toolkit.attack import (
    DATA_PARAMS,
    TRAIN_PARAMS,
    BuiltinAttack,
    Param,
    adversary_secret,
    thief_data,
    train_config,
)

if TYPE_CHECKING:
    from torch.utils.data import TensorDataset

    from auditor.toolkit.modelio import Runnable

__all__ = ["ForgeGreedyResiduals", "OverwriteGreedyResiduals", "register_attacks"]


class ForgeGreedyResiduals(BuiltinAttack):
    """Random signatures read against the watermarked layers: how close does a forgery come?"""

    id = "forge-gr"
    function_preserving = True
    description = "Greedy Residuals forging: match rates of random signatures on the owner's layers (model unchanged)."
    paper = "GR Table 6 and Fig. 5 (200 random signatures: rates near 50%)"
    scheme = "greedy-residuals"
    grid = ({"label": "forging: 200 random signatures", "group": "forging", "options": {"bundle": Attack.BUNDLE}},)
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
        from auditor.toolkit.modelio import read_model, save

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


class OverwriteGreedyResiduals(BuiltinAttack):
    """The adversary embeds their own Greedy Residuals signature into the stolen model."""

    id = "overwrite-gr"
    description = "Re-embed a Greedy Residuals watermark of the adversary's own key, with or without training data."
    paper = "GR Table 7 (overwriting, train with and without data)"
    grid = (
        {"label": "overwrite: adversary's Greedy Residuals, with data (Adam 0.001, 10 epochs)", "group": "overwriting",
         "options": {"optimizer": "adam", "lr": 1e-3, "epochs": 10}},
        {"label": "overwrite: adversary's Greedy Residuals, without data (noise, 10 epochs)", "group": "overwriting",
         "options": {"optimizer": "adam", "lr": 1e-3, "epochs": 10, "with_data": False}},
        {"label": "overwrite: adversary's Greedy Residuals, the owner's recipe (Adam 0.01, 20 epochs)",
         "group": "overwriting", "options": {"optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0, "epochs": 20}},
    )  # fmt: skip
    params = (
        Param(
            "with_data",
            True,
            "Train on the thief's data with the embedding term (else on noise images labelled by the stolen model).",
            bool,
        ),
        Param("message", "(c) the adversary", "The adversary's copyright statement."),
        Param("layers", None, "Parameters to mark, comma-separated (default: the owner-side rule)."),
        Param("adversary_bundle", None, "Also write the adversary's owner bundle to this path."),
        *(p for p in TRAIN_PARAMS if p.name != "optimizer"),
        Param("optimizer", "adam", "sgd, adam or adamw.", choices=("sgd", "adam", "adamw")),
        *DATA_PARAMS,
    )

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Embed the adversary's signature and write."""
        from cryptography.hazmat.primitives.asymmetric import ed25519

        from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
        from auditor.toolkit import training
        from auditor.toolkit.modelio import read_runnable, write_runnable

        found = read_runnable(model, model_factory=options["model_factory"], why="overwriting")
        layers = [n.strip() for n in options["layers"].split(",")] if options["layers"] else None
        key = ed25519.Ed25519PrivateKey.from_private_bytes(adversary_secret(options["seed"]))
        wm = GreedyResidualsWatermark.create(found.module, private_key=key, message=options["message"],
                                             layers=layers)  # fmt: skip
        data = thief_data(options) if options["with_data"] else _noise_data(found, options)
        steps = training.train(found.module, data, train_config(options), penalty=wm.penalty).steps
        write_runnable(found, out)
        if options["adversary_bundle"]:
            wm.save_bundle(Path(options["adversary_bundle"]), found.module, model_file=out, architecture=found.name)
        return {"model": found.name, "with_data": options["with_data"], "steps": steps,
                "adversary_layers": wm.layer_names, "adversary_rates": wm.rates(found.module)}  # fmt: skip


def _noise_data(found: Runnable, options: dict[str, Any]) -> TensorDataset:
    """The adversary without data: uniform noise images labelled by the stolen model itself, as many as
    the thief's data would hold (training on them keeps the model close to what it computed)."""
    import torch
    from torch.utils.data import TensorDataset

    count = len(thief_data(options))
    gen = torch.Generator().manual_seed(options["seed"])
    images = torch.rand((count, *found.input_shape), generator=gen)
    found.module.eval()
    with torch.no_grad():
        labels = found.module(images).argmax(dim=1)
    return TensorDataset(images, labels)


@hookimpl
def register_attacks(register: Callable[[Attack], None]) -> None:
    """Register the Greedy Residuals attacks."""
    register(ForgeGreedyResiduals())
    register(OverwriteGreedyResiduals())
