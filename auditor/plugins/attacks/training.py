"""Attacks that train the stolen model: fine-tuning and overwriting with the adversary's own watermark.

The thief's data is a seeded ``fraction`` of the owner's digits training split
(the owner's test split stays unseen, so the accuracy an evaluation measures
on it is honest), or whatever ``data_factory`` returns. The model must be one
:func:`~.model_io.runnable` recognises or ``model_factory`` builds.
"""

from __future__ import annotations

import base64
import hashlib
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import TensorDataset

from auditor.errors import UsageError
from auditor.toolkit import data as datasets
from auditor.toolkit import training
from auditor.toolkit.attack import BuiltinAttack, Param
from auditor.toolkit.modelio import Runnable, read_model, require_runnable, write_model

__all__ = ["FineTune", "FineTuneAnneal", "OverwriteGreedyResiduals", "OverwriteHufuNet", "thief_data"]

_DATA = (
    Param("fraction", 0.5, "The thief's share of the owner's digits training split (0 to 1).", float),
    Param("data_factory", None, "module:function returning (train, test) TensorDatasets: the thief's own data."),
)
_TRAIN = (
    Param("epochs", 10, "Training epochs over the thief's data.", int),
    Param("lr", 1e-3, "Initial learning rate.", float),
    Param("optimizer", "sgd", "sgd (momentum 0.9), adam or adamw.", choices=("sgd", "adam", "adamw")),
    Param("weight_decay", 5e-4, "Weight decay (the HufuNet paper's 'decay factor' 0.0005).", float),
    Param(
        "schedule",
        "constant",
        "Learning-rate schedule: constant, or cosine annealing to zero.",
        choices=("constant", "cosine"),
    ),
    Param("batch_size", 64, "Batch size.", int),
)


def thief_data(options: dict[str, Any]) -> TensorDataset:
    """The thief's training data (see the module docstring)."""
    if options["data_factory"]:
        return datasets.owner_dataset(options["data_factory"]).train
    fraction = options["fraction"]
    if fraction >= 1.0:
        return datasets.digits().train
    return datasets.split(datasets.digits(), fraction, seed=options["seed"])[0]


def _config(options: dict[str, Any]) -> training.TrainConfig:
    return training.TrainConfig(
        epochs=options["epochs"], batch_size=options["batch_size"], lr=options["lr"], optimizer=options["optimizer"],
        weight_decay=options["weight_decay"], seed=options["seed"], schedule=options["schedule"], device="cpu",
    )  # fmt: skip


def _stolen(model: Path, options: dict[str, Any], why: str) -> Runnable:
    source = read_model(model)
    found = require_runnable(source.state_dict(), model_factory=options["model_factory"], why=why)
    found.module.train()
    return found


def _new_head(module: nn.Module, seed: int) -> str:
    """Replace the last linear layer (in module order) with a freshly initialised one; return its name."""
    heads = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise UsageError("the model has no linear layer to replace with a new head")
    name, old = heads[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, head)
    return name


def _write(found: Runnable, out: Path) -> None:
    found.module.eval()
    write_model(found.module.state_dict(), out, model=found)


class FineTune(BuiltinAttack):
    """All layers trained further on the thief's data, optionally with a new classifier head."""

    id = "fine-tune"
    description = "Fine-tune every layer on the thief's data (optionally a new head; SGD or Adam; cosine schedule)."
    paper = "GR Table 3 (all layers, new head); HufuNet Table 2 (SGD 0.001, decay 0.0005, 10-100 epochs)"
    params: ClassVar[tuple[Param, ...]] = (
        *_TRAIN, Param("new_head", False, "Replace the classifier head first (transfer learning).", bool), *_DATA,
    )  # fmt: skip

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Train and write."""
        found = _stolen(model, options, "fine-tuning")
        config = _config(options)
        head = _new_head(found.module, options["seed"]) if options["new_head"] else None
        data = thief_data(options)
        result = training.train(found.module, data, config)
        _write(found, out)
        return {"model": found.name, "new_head": head, "train_size": len(data), "steps": result.steps,
                "final_loss": result.losses[-1] if result.losses else None}  # fmt: skip


class FineTuneAnneal(FineTune):
    """The "large learning rate, then anneal" fine-tune that removes many parameter watermarks."""

    id = "fine-tune-anneal"
    description = "Fine-tune with a large learning rate (0.05) annealed to zero by a cosine schedule."
    paper = "HufuNet section 5.10 (initial rate 0.05, cosine annealing; after Chen et al.)"
    params = tuple(
        Param(p.name, {"lr": 0.05, "schedule": "cosine", "epochs": 20}.get(p.name, p.default), p.help, p.kind,
              p.choices)
        for p in FineTune.params
    )  # fmt: skip


def _adversary_key(seed: int) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"adversary {seed}".encode()).digest())


class OverwriteGreedyResiduals(BuiltinAttack):
    """The adversary embeds their own Greedy Residuals signature into the stolen model."""

    id = "overwrite-gr"
    description = "Re-embed a Greedy Residuals watermark of the adversary's own key, with or without training data."
    paper = "GR Table 7 (overwriting, train with and without data)"
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
        *(p for p in _TRAIN if p.name != "optimizer"),
        Param("optimizer", "adam", "sgd, adam or adamw.", choices=("sgd", "adam", "adamw")),
        *_DATA,
    )

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Embed the adversary's signature and write."""
        from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark

        found = _stolen(model, options, "overwriting")
        layers = [n.strip() for n in options["layers"].split(",")] if options["layers"] else None
        wm = GreedyResidualsWatermark.create(found.module, private_key=_adversary_key(options["seed"]),
                                             message=options["message"], layers=layers)  # fmt: skip
        data = thief_data(options) if options["with_data"] else _noise_data(found, options)
        steps = training.train(found.module, data, _config(options), penalty=wm.penalty).steps
        _write(found, out)
        if options["adversary_bundle"]:
            wm.save_bundle(Path(options["adversary_bundle"]), found.module, model_file=out, architecture=found.name)
        return {"model": found.name, "with_data": options["with_data"], "steps": steps,
                "adversary_layers": wm.layer_names, "adversary_rates": wm.rates(found.module)}  # fmt: skip


def _noise_data(found: Runnable, options: dict[str, Any]) -> TensorDataset:
    """The adversary without data: uniform noise images labelled by the stolen model itself, as many as
    the thief's data would hold (training on them keeps the model close to what it computed)."""
    count = len(thief_data(options))
    gen = torch.Generator().manual_seed(options["seed"])
    images = torch.rand((count, *found.input_shape), generator=gen)
    found.module.eval()
    with torch.no_grad():
        labels = found.module(images).argmax(dim=1)
    return TensorDataset(images, labels)


class OverwriteHufuNet(BuiltinAttack):
    """The adversary hides their own HufuNet's EPH in the stolen model, at their own keyed positions."""

    id = "overwrite-hufunet"
    description = "Embed the adversary's own HufuNet (own key), then train with it frozen or not train at all."
    paper = "HufuNet section 5.7 (the adversary embeds a second HufuNet; both are found)"
    params = (
        Param(
            "with_data", True, "Train on the thief's data with the adversary's EPH frozen (else only write it).", bool
        ),
        Param("hufunet", None, "The adversary's secret HufuNet file (default: one trained now, seed + 1)."),
        Param("adversary_bundle", None, "Also write the adversary's (secret) owner bundle to this path."),
        *_TRAIN,
        *_DATA,
    )

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Plant the adversary's EPH, train if asked, write."""
        from auditor.plugins.hufunet.generate import generate_hufunet, load_hufunet
        from auditor.plugins.hufunet.owner import plant, write_bundle

        found = _stolen(model, options, "overwriting")
        with tempfile.TemporaryDirectory(prefix="auditor-adversary-") as tmp:
            secret_file = Path(options["hufunet"] or Path(tmp) / "adversary_hufunet.json")
            if not options["hufunet"]:  # a key from the seed, so the attack is repeatable
                derived = hashlib.sha256(f"adversary {options['seed']}".encode()).digest()
                generate_hufunet(out=secret_file, seed=options["seed"] + 1, hmac_key=derived)
            net, secret = load_hufunet(secret_file)
            key = base64.b64decode(secret["hmac_key"])
            embedded = plant(found.module, net, key)
            try:
                steps = 0
                if options["with_data"]:
                    steps = training.train(found.module, thief_data(options), _config(options),
                                            after_step=embedded.frozen.after_step).steps  # fmt: skip
            finally:
                embedded.frozen.detach()
            _write(found, out)
            bundle = Path(options["adversary_bundle"] or Path(tmp) / "adversary_bundle.json")
            _, payload = write_bundle(bundle, found.module, embedded, net, secret, files={"safetensors": out},
                                      architecture=found.name)  # fmt: skip
        return {"model": found.name, "with_data": options["with_data"], "steps": steps,
                "adversary_eph_kernels": len(embedded.positions), "host_kernels": embedded.n,
                "adversary_acc_combined": payload["release"]["acc_combined"]}  # fmt: skip
