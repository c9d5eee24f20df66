"""Registers the scheme-free built-in attacks (``register_attacks``); importing it imports no attack's heavy code.

The attacks on one scheme (forging, overwriting) come with that scheme's plugin.
"""

from __future__ import annotations

from collections.abc import Callable

from auditor import hookimpl
from auditor.bases import Attack

__all__ = ["builtin_attacks", "register_attacks"]


def builtin_attacks() -> list[Attack]:
    """One instance of every scheme-free built-in attack, in id order."""
    from auditor.plugins.attacks import equivalence, export, linear, structure, training, transformer, weights

    classes: list[type[Attack]] = [
        weights.MagnitudePruning, weights.RandomPruning, weights.ChannelPruning, weights.Fp16Cast,
        weights.Bf16Cast, weights.Int8Quantization, structure.Permutation, structure.Scaling, structure.SignFlip,
        structure.ChannelExpansion, structure.CutOff, structure.Supplement, structure.FactorLinear,
        export.BatchNormFolding,
        export.OnnxExport, export.QuantizeDynamic, training.FineTune, training.FineTuneAnneal,
        linear.InsertIdentity, linear.BatchNormBetween, linear.FactorChain, linear.InvertibleMap,
        equivalence.SplitOutputs, equivalence.SplitInputs, equivalence.NeuronClique, equivalence.NeuronSplit,
        transformer.HeadPermute, transformer.MlpPermute, transformer.HeadScale, transformer.NormFold,
        transformer.ResidualRotate, transformer.RopeReorder,
    ]  # fmt: skip
    return sorted((cls() for cls in classes), key=lambda a: a.id)


@hookimpl
def register_attacks(register: Callable[[Attack], None]) -> None:
    """Register every scheme-free built-in attack."""
    for attack in builtin_attacks():
        register(attack)
