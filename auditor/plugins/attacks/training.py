"""Attacks that train the stolen model: fine-tuning, with or without a new classifier head.

The thief's data is a seeded ``fraction`` of the owner's digits training split,
or whatever ``data_factory`` returns (:func:`~auditor.toolkit.attack.thief_data`).
The model must be one :func:`~auditor.toolkit.modelio.runnable` recognises or
``model_factory`` builds. Overwriting with the adversary's own watermark is an
attack on a scheme, so each scheme's plugin brings its own (``overwrite-gr``,
``overwrite-hufunet``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from auditor.errors import UsageError
from auditor.toolkit.attack import DATA_PARAMS, TRAIN_PARAMS, BuiltinAttack, Param, thief_data, train_config

if TYPE_CHECKING:  # torch and the training loop load when an attack runs, not when it registers
    from torch import nn

__all__ = ["FineTune", "FineTuneAnneal"]


def _new_head(module: nn.Module, seed: int) -> str:
    """Replace the last linear layer (in module order) with a freshly initialised one; return its name."""
    import torch
    from torch import nn

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


class FineTune(BuiltinAttack):
    """All layers trained further on the thief's data, optionally with a new classifier head."""

    id = "fine-tune"
    description = "Fine-tune every layer on the thief's data (optionally a new head; SGD or Adam; cosine schedule)."
    paper = "GR Table 3 (all layers, new head); HufuNet Table 2 (SGD 0.001, decay 0.0005, 10-100 epochs)"
    params: ClassVar[tuple[Param, ...]] = (
        *TRAIN_PARAMS,
        Param("new_head", False, "Replace the classifier head first (transfer learning).", bool),
        *DATA_PARAMS,
    )

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Train and write."""
        from auditor.toolkit import training
        from auditor.toolkit.modelio import read_runnable, write_runnable

        found = read_runnable(model, model_factory=options["model_factory"], why="fine-tuning")
        config = train_config(options)
        head = _new_head(found.module, options["seed"]) if options["new_head"] else None
        data = thief_data(options)
        result = training.train(found.module, data, config)
        write_runnable(found, out)
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
