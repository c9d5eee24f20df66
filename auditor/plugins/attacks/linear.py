"""Linear structure attacks: edits that add linear operations, or a map and its inverse, keeping the function.

Each one is an edit of :mod:`auditor.toolkit.edits` that restore's canonical
form (fusion of linear chains) or basis alignment undoes:

* ``insert-identity``: an identity 1x1 convolution (or square linear layer)
  after each chosen layer;
* ``bn-between``: each chosen layer ``W`` as ``Q^T W``, a batch-norm with
  random statistics, and a 1x1 convolution that undoes both;
* ``chain``: each chosen layer factored into three linear operations
  (``A W``, an orthogonal ``Q``, ``(Q A)^-1``);
* ``invertible-map``: an invertible (not just orthogonal) map and its
  inverse between two linear layers the architecture already has with
  nothing nonlinear between them (LFEA); the names and shapes stay.

Each checks the largest logit change on random inputs before writing, and
refuses past :data:`TOLERANCE`. A model with new layers (the first three) is
no built-in architecture: an ``.onnx`` output runs anywhere; a
``.safetensors`` or ``.pt`` one keeps the new names (``conv1.0``,
``conv1.1``), which auditor reads and audits but cannot run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.errors import NotApplicableError, UsageError
from auditor.toolkit.attack import BuiltinAttack, Param, require_same_function

if TYPE_CHECKING:  # torch loads when an attack runs, not when it registers
    from torch import nn

__all__ = ["TOLERANCE", "BatchNormBetween", "FactorChain", "InsertIdentity", "InvertibleMap"]

#: Largest logit change these attacks accept before refusing to write (float32 rounding is ~1e-6).
TOLERANCE = 1e-4

_LAYERS = Param("layers", None, "Comma-separated module names to edit (default: every ungrouped convolution and "
                "linear layer).")  # fmt: skip


def _names(options: dict[str, Any], key: str = "layers") -> list[str] | None:
    value = options[key]
    return [n.strip() for n in value.split(",") if n.strip()] if value else None


class _ModuleEdit(BuiltinAttack):
    """Build the model, replace its layers by an equivalent structure, check the outputs, write."""

    function_preserving = True

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Build, edit, check, write."""
        from auditor.toolkit.modelio import export_onnx, read_model, require_runnable, write_model
        from auditor.toolkit.recognise import Runnable

        found = require_runnable(read_model(model).state_dict(), model_factory=options["model_factory"], why=self.id)
        edited, names = self.edit(found.module, options)
        change = require_same_function(model, found, edited, seed=options["seed"], tolerance=TOLERANCE)
        if out.suffix.lower() == ".onnx":
            export_onnx(Runnable(edited.eval(), found.name, found.input_shape, input_dtype=found.input_dtype), out)
        else:
            write_model(edited.state_dict(), out)
        return {"model": found.name, "edited": names, "max_output_change": change}

    def edit(self, module: nn.Module, options: dict[str, Any]) -> tuple[nn.Module, list[str]]:
        """The edited copy of ``module`` and the layers edited."""
        raise NotImplementedError


class InsertIdentity(_ModuleEdit):
    """An identity 1x1 convolution or square linear layer inserted after each chosen layer."""

    id = "insert-identity"
    description = "Insert an identity 1x1 convolution (or linear layer) after every layer (the same function)."
    paper = "restore v2 (issue 13): identity layers"
    params = (_LAYERS,)

    def edit(self, module: nn.Module, options: dict[str, Any]) -> tuple[nn.Module, list[str]]:
        """Insert."""
        from auditor.toolkit import edits

        return edits.insert_identity(module, layers=_names(options))


class BatchNormBetween(_ModuleEdit):
    """Each chosen layer followed by a random batch-norm and a 1x1 convolution that undoes it (and ``Q``)."""

    id = "bn-between"
    description = "Write every layer as Q^T W, a random batch-norm and a 1x1 layer undoing both (the same function)."
    paper = "restore v2 (issue 13): conv -> batch-norm -> conv"
    params = (_LAYERS,)

    def edit(self, module: nn.Module, options: dict[str, Any]) -> tuple[nn.Module, list[str]]:
        """Split through a batch-norm."""
        from auditor.toolkit import edits

        return edits.bn_between(module, seed=options["seed"], layers=_names(options))


class FactorChain(_ModuleEdit):
    """Each chosen layer factored into three linear operations."""

    id = "chain"
    description = "Factor every layer into three linear operations: A W, an orthogonal Q, (Q A)^-1 (the same function)."
    paper = "restore v2 (issue 13): linear chains (LFEA, IEEE TIFS 2023)"
    params = (
        _LAYERS,
        Param("condition", 10.0, "Condition number of the invertible map A.", float),
    )

    def edit(self, module: nn.Module, options: dict[str, Any]) -> tuple[nn.Module, list[str]]:
        """Factor in three."""
        from auditor.toolkit import edits

        return edits.factor_chain(module, seed=options["seed"], layers=_names(options), condition=options["condition"])


class InvertibleMap(BuiltinAttack):
    """An invertible map ``A`` after one linear layer and ``A^-1`` before the next, where the architecture has
    two linear layers with nothing nonlinear between them (LFEA)."""

    id = "invertible-map"
    function_preserving = True
    description = "Put an invertible map and its inverse between two linear layers with nothing nonlinear between."
    paper = "LFEA (IEEE TIFS 2023): linear functionality equivalence"
    params = (
        Param("pairs", None, "Comma-separated first layers of the pairs to edit (default: every pair)."),
        Param("condition", 10.0, "Condition number of each map.", float),
    )

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Find the pairs on a graph with real edges, map, check the outputs, write."""
        import copy

        from auditor.toolkit import edits
        from auditor.toolkit.modelio import read_model, require_runnable, save, working_graph
        from auditor.toolkit.recognise import load_into

        source = read_model(model)
        found = require_runnable(source.state_dict(), model_factory=options["model_factory"], why=self.id)
        graph, edges_from = working_graph(source, found)
        pairs = edits.linear_pairs(graph)
        if not pairs:
            raise NotApplicableError(
                f"{model}: no two linear layers with nothing nonlinear between them (a linear layer feeding one, "
                "a convolution feeding a 1x1 convolution): no map fits"
            )
        chosen = _names(options, "pairs")
        if chosen is not None:
            unknown = [n for n in chosen if n not in {a for a, _ in pairs}]
            if unknown:
                raise UsageError(f"no pair starts at {', '.join(unknown)}: pairs: "
                                 + ", ".join(f"{a} -> {b}" for a, b in pairs))  # fmt: skip
            pairs = [p for p in pairs if p[0] in chosen]
        tensors = edits.invertible_map(graph, source.tensors, pairs, seed=options["seed"],
                                       condition=options["condition"])  # fmt: skip
        edited = copy.deepcopy(found.module)
        load_into(edited, source.state_dict(tensors))
        change = require_same_function(model, found, edited, seed=options["seed"], tolerance=TOLERANCE)
        save(source, tensors, out, model_factory=options["model_factory"])
        return {"model": found.name, "edges_from": edges_from, "pairs": [list(p) for p in pairs],
                "condition": options["condition"], "max_output_change": change}  # fmt: skip
