"""The attack grid ``auditor evaluate`` runs: each attack at the strengths the papers measure.

Scaled to the digits models (see docs/robustness.md): fine-tuning counts
epochs as passes over the thief's data, as the papers do, so an epoch is 12
steps here where it was about 125 in the HufuNet paper.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from auditor.errors import UsageError

__all__ = ["BASELINE", "GROUP_ORDER", "ONNX_ATTACKS", "Cell", "contributed", "full_grid", "quick_grid", "select"]

#: The cell that evaluates the model as it is.
BASELINE = "none"
#: The attacks that write an ONNX file (run in onnxruntime when the grid measures accuracy).
ONNX_ATTACKS = frozenset({"onnx-export", "quantize-dynamic", "factor-linear", "insert-identity", "bn-between", "chain",
                          "split-outputs", "split-inputs"})  # fmt: skip


@dataclass(frozen=True)
class Cell:
    """One attack at one strength. ``strength`` is the x value of a plot series (``series``)."""

    attack: str
    label: str
    group: str
    options: Mapping[str, Any] = field(default_factory=dict)
    series: str = ""
    strength: float | None = None

    @property
    def key(self) -> str:
        """A stable id: the attack and its options (what a resumed run matches on)."""
        return f"{self.attack} {json.dumps(dict(self.options), sort_keys=True)}"

    @property
    def suffix(self) -> str:
        """The file type the attacked model is written as."""
        return ".onnx" if self.attack in ONNX_ATTACKS else ".safetensors"


_SGD = {"optimizer": "sgd", "lr": 1e-3, "weight_decay": 5e-4}


def _pruning() -> Iterable[Cell]:
    rates = [r / 10 for r in range(1, 10)]
    for scope, name in (("global", "global"), ("layer", "per layer")):
        for r in rates:
            yield Cell("prune-magnitude", f"magnitude pruning {name} {r:.0%}", "pruning",
                       {"rate": r, "scope": scope}, f"magnitude pruning, {name}", r)  # fmt: skip
    for r in (0.1, 0.3, 0.5, 0.7, 0.9):
        yield Cell("prune-random", f"random pruning {r:.0%}", "pruning", {"rate": r}, "random pruning", r)
    for r in (0.1, 0.25, 0.5):
        yield Cell("prune-channels", f"filter pruning (L1) {r:.0%}", "pruning", {"rate": r}, "filter pruning", r)


def _fine_tuning() -> Iterable[Cell]:
    for epochs in (10, 50, 100):
        yield Cell("fine-tune", f"fine-tune, SGD 0.001 (paper), {epochs} epochs", "fine-tuning",
                   {**_SGD, "epochs": epochs}, "fine-tune, SGD 0.001", epochs)  # fmt: skip
    yield Cell("fine-tune", "fine-tune with a new head, Adam 0.001, 10 epochs", "fine-tuning",
               {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "epochs": 10, "new_head": True})  # fmt: skip
    yield Cell("fine-tune", "fine-tune, Adam 0.01 (the owner's rate), 10 epochs", "fine-tuning",
               {"optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0, "epochs": 10})  # fmt: skip
    yield Cell("fine-tune-anneal", "large rate then anneal, SGD 0.05 cosine, 20 epochs", "fine-tuning",
               {"optimizer": "sgd", "lr": 0.05, "epochs": 20})  # fmt: skip
    yield Cell("fine-tune-anneal", "large rate then anneal, Adam 0.05 cosine, 20 epochs", "fine-tuning",
               {"optimizer": "adam", "lr": 0.05, "weight_decay": 0.0, "epochs": 20})  # fmt: skip


#: The order of the groups other plugins' attacks add cells to (unknown groups follow, by name).
GROUP_ORDER = ("overwriting", "forging")


def contributed(bundles: Mapping[str, str] | None = None) -> list[Cell]:
    """The cells the registered attacks declare (:attr:`auditor.bases.Attack.grid`), by group then attack id;
    a cell asking for its scheme's owner bundle gets its path from ``bundles`` (scheme -> path), or is left out."""
    from auditor.bases import Attack
    from auditor.plugin_manager import components

    bundles = bundles or {}
    cells = []
    for attack in components("attacks", Attack):
        for spec in attack.grid:
            options = dict(spec.get("options", {}))
            if Attack.BUNDLE in options.values():
                if attack.scheme not in bundles:
                    continue
                options = {k: bundles[attack.scheme] if v == Attack.BUNDLE else v for k, v in options.items()}
            cells.append(Cell(attack.id, str(spec["label"]), str(spec["group"]), options,
                              str(spec.get("series", "")), spec.get("strength")))  # fmt: skip
    rank = {g: i for i, g in enumerate(GROUP_ORDER)}
    return sorted(cells, key=lambda c: (rank.get(c.group, len(rank)), c.group, c.attack))


def full_grid(*, bundles: Mapping[str, str] | None = None) -> list[Cell]:
    """Every attack at the papers' strengths, with the cells other plugins' attacks add; ``bundles`` (scheme ->
    path of the audited owner bundle) enables the cells that need one (a forgery against the owner's layers)."""
    cells = [Cell(BASELINE, "no attack (the model as released)", "baseline")]
    cells += [
        Cell("permute", "permutation of every layer's channels", "function-preserving"),
        Cell("scale", "per-channel scaling in [1/4, 4], before batch-norm", "function-preserving"),
        Cell(
            "scale", "per-channel scaling in [1/4, 4], after batch-norm", "function-preserving", {"before_norm": False}
        ),
        Cell("sign-flip", "sign flip of half the channels through batch-norm", "function-preserving"),
        Cell("expand", "channel expansion (one layer doubled)", "function-preserving"),
        Cell("bn-fold", "batch-norm folded", "function-preserving"),
        Cell("onnx-export", "ONNX export (legacy exporter, folded)", "function-preserving"),
        Cell(
            "factor-linear",
            "every linear layer factored through an orthogonal map (Q^T W, then Q)",
            "function-preserving",
        ),
        Cell("insert-identity", "an identity layer inserted after every layer", "function-preserving"),
        Cell("split-outputs", "every layer as two branches over its outputs, concatenated", "function-preserving"),
        Cell("split-inputs", "every layer as two branches over its inputs, summed", "function-preserving"),
        Cell("neuron-clique", "four dummy units per hidden layer (NeuronClique)", "function-preserving"),
        Cell("neuron-split", "four units per hidden layer split in two (NeuronSplit)", "function-preserving"),
        Cell("bn-between", "every layer split through a random batch-norm (Q^T W, BN, undone)", "function-preserving"),
        Cell("chain", "every layer factored into three linear operations (A W, Q, (QA)^-1), A of condition 4",
             "function-preserving", {"condition": 4.0}),
        Cell("invertible-map", "an invertible map (condition 10) between two linear layers", "function-preserving"),
        # Transformer edits: not applicable (a cell marked n/a, with the reason) to a model that is no transformer.
        Cell("head-permute", "attention heads permuted (Q, K, V rows and O columns)", "function-preserving"),
        Cell("mlp-permute", "MLP units permuted (up/gate rows, down columns)", "function-preserving"),
        Cell("head-scale", "per-head Q/K and V/O scaling", "function-preserving"),
        Cell("norm-fold", "norm weights folded into the following linear layers", "function-preserving"),
        Cell("residual-rotate", "the residual stream rotated (QuaRot/SliceGPT-style)", "function-preserving"),
        Cell("rope-reorder", "llama.cpp's rotary Q/K row order", "function-preserving"),
    ]
    cells += [
        Cell("cast-fp16", "float16 cast", "precision"),
        Cell("cast-bf16", "bfloat16 cast", "precision"),
        Cell("quantize-int8", "int8 weight quantization", "precision"),
        Cell("quantize-int8", "4-bit weight quantization", "precision", {"bits": 4}),
        Cell("quantize-dynamic", "ONNX dynamic quantization (onnxruntime, int8 weights)", "precision"),
        Cell(
            "quantize-dynamic",
            "ONNX dynamic quantization (onnxruntime, uint8, per channel)",
            "precision",
            {"weight_type": "uint8", "per_channel": True},
        ),
    ]
    cells += list(_pruning())
    cells += [Cell("cut-off", f"kernels cut-off {f:.0%}", "channels", {"fraction": f}) for f in (0.02, 0.05, 0.1)]
    cells += [Cell("supplement", f"kernels supplement {f:.0%}", "channels", {"fraction": f}) for f in (0.05, 0.1)]
    cells += list(_fine_tuning())
    cells += contributed(bundles)
    return cells


def quick_grid(*, bundles: Mapping[str, str] | None = None) -> list[Cell]:
    """A few cheap cells: a smoke test of the whole pipeline."""
    keep = {"no attack (the model as released)", "permutation of every layer's channels", "batch-norm folded",
            "magnitude pruning global 30%", "magnitude pruning global 90%", "float16 cast"}  # fmt: skip
    return [c for c in full_grid(bundles=bundles) if c.label in keep]


def select(cells: list[Cell], attacks: list[str] | None, known: Iterable[str]) -> list[Cell]:
    """The baseline and the cells of the named attacks (all cells when ``attacks`` is empty)."""
    if not attacks:
        return cells
    unknown = sorted(set(attacks) - set(known) - {BASELINE})
    if unknown:
        raise UsageError(f"unknown attack(s) {', '.join(unknown)}; `auditor attack --list` shows them")
    chosen = [c for c in cells if c.attack == BASELINE or c.attack in attacks]
    if len(chosen) == 1:
        raise UsageError(
            f"the grid has no cell for {', '.join(attacks)} (an attack on a scheme needs an owner bundle of it)"
        )
    return chosen
