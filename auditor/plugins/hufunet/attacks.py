"""Attacks on HufuNet: forging a HufuNet out of the stolen model, and overwriting with one's own.

Forging (its paper, section 5.7) leaves the model unchanged (it is written
back, so the attack fits the evaluation grid like any other) and says whether
the forgery would support a claim: "first correlation then accuracy" tries keys
against the placement correlation and builds a HufuNet from the kernels they
tie; "first accuracy then correlation" searches the model for the adversary's
own HufuNet's kernels within +-n% (Table 8). Overwriting plants the adversary's
own HufuNet at their own keyed positions and trains with it frozen; both are
found afterwards. Importing this module imports no torch: each attack loads
what it needs when it runs.
"""

from __future__ import annotations

import base64
import tempfile
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
    import torch

__all__ = ["MATCH_RANGES", "ForgeHufuNet", "OverwriteHufuNet", "closest_kernels", "register_attacks"]

#: The +-n% ranges of the HufuNet paper's Table 8.
MATCH_RANGES = (0.25, 0.50, 0.75, 0.80, 0.90)


def closest_kernels(
    eph: torch.Tensor, host: torch.Tensor, *, small: float, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """For each EPH kernel (rows of ``eph``, 9 values), the host kernel (rows of ``host``) with the smallest
    largest relative deviation over the EPH values with ``|v| >= small``, and that deviation."""
    import torch

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
    grid = (
        {"label": "forging: 100 keys, first correlation then accuracy", "group": "forging", "options": {}},
        {"label": "forging: own HufuNet searched, first accuracy then correlation", "group": "forging",
         "options": {"method": "accuracy"}},
    )  # fmt: skip
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
        from auditor.toolkit.modelio import read_model, save

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
        import torch

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


class OverwriteHufuNet(BuiltinAttack):
    """The adversary hides their own HufuNet's EPH in the stolen model, at their own keyed positions."""

    id = "overwrite-hufunet"
    description = "Embed the adversary's own HufuNet (own key), then train with it frozen or not train at all."
    paper = "HufuNet section 5.7 (the adversary embeds a second HufuNet; both are found)"
    grid = (
        {"label": "overwrite: adversary's HufuNet, with data (frozen, SGD 0.001, 10 epochs)", "group": "overwriting",
         "options": {"optimizer": "sgd", "lr": 1e-3, "weight_decay": 5e-4, "epochs": 10}},
        {"label": "overwrite: adversary's HufuNet, without data (written in only)", "group": "overwriting",
         "options": {"with_data": False}},
    )  # fmt: skip
    params = (
        Param(
            "with_data", True, "Train on the thief's data with the adversary's EPH frozen (else only write it).", bool
        ),
        Param("hufunet", None, "The adversary's secret HufuNet file (default: one trained now, seed + 1)."),
        Param("adversary_bundle", None, "Also write the adversary's (secret) owner bundle to this path."),
        *TRAIN_PARAMS,
        *DATA_PARAMS,
    )

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Plant the adversary's EPH, train if asked, write."""
        from auditor.plugins.hufunet.generate import generate_hufunet, load_hufunet
        from auditor.plugins.hufunet.owner import plant, write_bundle
        from auditor.toolkit import training
        from auditor.toolkit.modelio import read_runnable, write_runnable

        found = read_runnable(model, model_factory=options["model_factory"], why="overwriting")
        with tempfile.TemporaryDirectory(prefix="auditor-adversary-") as tmp:
            secret_file = Path(options["hufunet"] or Path(tmp) / "adversary_hufunet.json")
            if not options["hufunet"]:  # a key from the seed, so the attack is repeatable
                generate_hufunet(out=secret_file, seed=options["seed"] + 1, hmac_key=adversary_secret(options["seed"]))
            net, secret = load_hufunet(secret_file)
            key = base64.b64decode(secret["hmac_key"])
            embedded = plant(found.module, net, key)
            try:
                steps = 0
                if options["with_data"]:
                    steps = training.train(found.module, thief_data(options), train_config(options),
                                           after_step=embedded.frozen.after_step).steps  # fmt: skip
            finally:
                embedded.frozen.detach()
            write_runnable(found, out)
            bundle = Path(options["adversary_bundle"] or Path(tmp) / "adversary_bundle.json")
            _, payload = write_bundle(bundle, found.module, embedded, net, secret, files={"safetensors": out},
                                      architecture=found.name)  # fmt: skip
        return {"model": found.name, "with_data": options["with_data"], "steps": steps,
                "adversary_eph_kernels": len(embedded.positions), "host_kernels": embedded.n,
                "adversary_acc_combined": payload["release"]["acc_combined"]}  # fmt: skip


@hookimpl
def register_attacks(register: Callable[[Attack], None]) -> None:
    """Register the HufuNet attacks."""
    register(ForgeHufuNet())
    register(OverwriteHufuNet())
