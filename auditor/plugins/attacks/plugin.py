"""Registers the built-in attacks (``register_attacks``); importing it imports no attack's heavy code."""

from __future__ import annotations

from collections.abc import Callable

from auditor import hookimpl
from auditor.bases import Attack

__all__ = ["builtin_attacks", "register_attacks"]


def builtin_attacks() -> list[Attack]:
    """One instance of every built-in attack, in id order."""
    from auditor.plugins.attacks import export, forging, structure, training, weights

    classes: list[type[Attack]] = [
        weights.MagnitudePruning, weights.RandomPruning, weights.ChannelPruning, weights.Fp16Cast,
        weights.Bf16Cast, weights.Int8Quantization, structure.Permutation, structure.Scaling, structure.SignFlip,
        structure.ChannelExpansion, structure.CutOff, structure.Supplement, export.BatchNormFolding,
        export.OnnxExport, training.FineTune, training.FineTuneAnneal, training.OverwriteGreedyResiduals,
        training.OverwriteHufuNet, forging.ForgeGreedyResiduals, forging.ForgeHufuNet,
    ]  # fmt: skip
    return sorted((cls() for cls in classes), key=lambda a: a.id)


@hookimpl
def register_attacks(register: Callable[[Attack], None]) -> None:
    """Register every built-in attack."""
    for attack in builtin_attacks():
        register(attack)
