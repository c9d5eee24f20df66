"""Equivalent-structure attacks: branches and dummy neurons (:mod:`auditor.toolkit.equivalent`).

* ``split-outputs``: each chosen layer as ``k`` layers over groups of its output channels, concatenated;
* ``split-inputs``: each chosen layer as ``k`` layers over groups of its input channels, summed;
* ``neuron-clique``: dummy units in each chosen hidden layer, in cliques that share one fan-in and whose
  fan-outs cancel (NeuronClique, Yan et al., USENIX Security 2023);
* ``neuron-split``: units of each chosen hidden layer split into positively scaled copies whose fan-outs
  add up to the original's (NeuronSplit, same paper).

Each checks the largest logit change on random inputs before writing and refuses past
:data:`TOLERANCE`. A split model is no built-in architecture: an ``.onnx`` output runs anywhere
(Concat, or Split and Add, in its graph); a ``.safetensors`` or ``.pt`` one keeps the branch names a
thief's code writes (``conv1.0.weight``, ``conv1.1.weight``), which auditor reads and audits but cannot
run. A model with dummy units is its built-in architecture, wider: every output runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.toolkit.attack import BuiltinAttack, Param, require_same_function

if TYPE_CHECKING:  # torch loads when an attack runs, not when it registers
    from torch import nn

    Edited = tuple[nn.Module, dict[str, Any]]

__all__ = ["TOLERANCE", "NeuronClique", "NeuronSplit", "SplitInputs", "SplitOutputs"]

#: Largest logit change these attacks accept before refusing to write (float32 rounding is ~1e-7).
TOLERANCE = 1e-4

_PAPER = "NeuronClique / NeuronSplit (Yan et al., USENIX Security 2023)"


def _names(value: str | None) -> list[str] | None:
    return [n.strip() for n in value.split(",") if n.strip()] if value else None


class _Equivalent(BuiltinAttack):
    """Build the model, rewrite it into an equivalent structure, check the outputs, write."""

    function_preserving = True

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Build, edit, check, write."""

        from auditor.toolkit.modelio import export_onnx, read_model, require_runnable, write_model
        from auditor.toolkit.recognise import Runnable

        found = require_runnable(read_model(model).state_dict(), model_factory=options["model_factory"], why=self.id)
        edited, info = self.edit(found.module.eval(), options, found.input_shape)
        change = require_same_function(model, found, edited, seed=options["seed"], tolerance=TOLERANCE)
        if out.suffix.lower() == ".onnx":
            export_onnx(Runnable(edited, found.name, found.input_shape, input_dtype=found.input_dtype), out)
        else:
            write_model(edited.state_dict(), out)
        return {"model": found.name, **info, "max_output_change": change}

    def edit(self, module: nn.Module, options: dict[str, Any], shape: tuple[int, ...]) -> Edited:
        """The edited copy of ``module`` and what was done."""
        raise NotImplementedError


_LAYERS = Param("layers", None, "Comma-separated module names to split (default: every ungrouped convolution and "
                "linear layer wide enough).")  # fmt: skip
_HIDDEN = Param("layers", None, "Comma-separated hidden layers to edit (default: every convolution or linear layer "
                "that alone feeds another through a nonlinearity).")  # fmt: skip


class SplitOutputs(_Equivalent):
    """Each chosen layer computed as ``k`` layers over groups of its output channels, concatenated."""

    id = "split-outputs"
    description = "Compute every layer as k branches over groups of its output channels, concatenated."
    paper = "restore v2 (issue 13): parallel branches (outputs concatenated)"
    params = (_LAYERS, Param("k", 2, "Branches per layer.", int))

    def edit(self, module: nn.Module, options: dict[str, Any], shape: tuple[int, ...]) -> Edited:
        """Split the outputs."""
        from auditor.toolkit import equivalent

        edited, names = equivalent.split_outputs(module, k=options["k"], layers=_names(options["layers"]))
        return edited, {"split": names, "k": options["k"]}


class SplitInputs(_Equivalent):
    """Each chosen layer computed as ``k`` layers over groups of its input channels, summed."""

    id = "split-inputs"
    description = "Compute every layer as k branches over groups of its input channels, summed."
    paper = "restore v2 (issue 13): parallel branches (inputs split, outputs summed)"
    params = (_LAYERS, Param("k", 2, "Branches per layer.", int))

    def edit(self, module: nn.Module, options: dict[str, Any], shape: tuple[int, ...]) -> Edited:
        """Split the inputs."""
        from auditor.toolkit import equivalent

        edited, names = equivalent.split_inputs(module, k=options["k"], layers=_names(options["layers"]))
        return edited, {"split": names, "k": options["k"]}


class NeuronClique(_Equivalent):
    """Dummy units in cliques: one shared fan-in, fan-outs that sum to zero in every reader."""

    id = "neuron-clique"
    description = "Add dummy units to every hidden layer, in cliques whose fan-outs cancel (the same function)."
    paper = _PAPER
    params = (
        _HIDDEN,
        Param("dummies", 4, "Dummy units per layer (rounded up to whole cliques).", int),
        Param("group", 2, "Units per clique.", int),
    )

    def edit(self, module: nn.Module, options: dict[str, Any], shape: tuple[int, ...]) -> Edited:
        """Add the cliques."""
        from auditor.toolkit import equivalent

        edited, added = equivalent.neuron_clique(module, seed=options["seed"], layers=_names(options["layers"]),
                                                 dummies=options["dummies"], group=options["group"],
                                                 input_shape=shape)  # fmt: skip
        return edited, {"added": added}


class NeuronSplit(_Equivalent):
    """Units split into positively scaled copies whose fan-outs add up to the original's."""

    id = "neuron-split"
    description = "Split units of every hidden layer into scaled copies whose fan-outs sum to the original's."
    paper = _PAPER
    params = (
        _HIDDEN,
        Param("units", 4, "Units to split per layer.", int),
        Param("parts", 2, "Copies each split unit becomes.", int),
    )

    def edit(self, module: nn.Module, options: dict[str, Any], shape: tuple[int, ...]) -> Edited:
        """Split the units."""
        from auditor.toolkit import equivalent

        edited, added = equivalent.neuron_split(module, seed=options["seed"], layers=_names(options["layers"]),
                                                units=options["units"], parts=options["parts"],
                                                input_shape=shape)  # fmt: skip
        return edited, {"added": added}
