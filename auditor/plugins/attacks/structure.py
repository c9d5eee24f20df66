"""Channel attacks: the restore stage's function-preserving edits, kernel cut-off and supplement.

The edits themselves are :mod:`auditor.toolkit.edits`' (the very
operations restore undoes); this module reads the file, finds a graph with
real edges for them (:func:`~.model_io.working_graph`) and writes the result.
Permutation, scaling, sign flips and expansion keep the model's function;
cut-off removes channels and supplement adds channels that the next layer
reads, which do not. ``factor-linear`` changes the structure itself: each layer
becomes two with a random orthogonal map between them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.errors import UsageError
from auditor.graph import LayerGraph
from auditor.toolkit.attack import BuiltinAttack, Param, require_same_function

if TYPE_CHECKING:  # torch, the edits and the model I/O load when an attack runs, not when it registers
    from auditor.toolkit.channels import Tensors
    from auditor.toolkit.modelio import Source

__all__ = ["ChannelExpansion", "CutOff", "FactorLinear", "Permutation", "Scaling", "SignFlip", "Supplement"]


def _prepare(model: Path, options: dict[str, Any]) -> tuple[Source, LayerGraph, str]:
    from auditor.toolkit import edits
    from auditor.toolkit.modelio import read_model, runnable, working_graph

    source = read_model(model)
    module = runnable(source.state_dict(), model_factory=options["model_factory"])
    graph, edges_from = working_graph(source, module)
    if not edits.free_spaces(graph):
        raise UsageError(f"{model}: no channel of this model can move without changing its function "
                         "(no convolution or linear layer feeds another)")  # fmt: skip
    return source, graph, edges_from


def _spaces(graph: LayerGraph) -> list[dict[str, Any]]:
    from auditor.toolkit import edits

    return [{"producers": sp.producers, "width": sp.width} for sp in edits.free_spaces(graph)]


class _ChannelAttack(BuiltinAttack):
    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Read, edit the channels, write."""
        from auditor.toolkit.modelio import save

        source, graph, edges_from = _prepare(model, options)
        tensors, info = self.edit(graph, source.tensors, options)
        save(source, tensors, out, model_factory=options["model_factory"])
        return {"edges_from": edges_from, "spaces": _spaces(graph), **info}

    def edit(self, graph: LayerGraph, tensors: Tensors, options: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        """The edited tensors and what was done."""
        raise NotImplementedError


class Permutation(_ChannelAttack):
    """Every free channel space in a random order, readers following (structure adjustment)."""

    id = "permute"
    function_preserving = True
    description = "Permute every layer's output channels and its readers' inputs (the model computes the same)."
    paper = "GR Table 4; HufuNet Table 5 (structure adjustment)"

    def edit(self, graph: LayerGraph, tensors: Tensors, options: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        """Permute."""
        import torch

        from auditor.toolkit import edits

        result, maps = edits.permute(graph, tensors, seed=options["seed"])
        moved = sum(int((index != torch.arange(len(index))).sum()) for index in maps.values())
        return result, {"channels_moved": moved}


class Scaling(_ChannelAttack):
    """Per-channel positive factors, compensated (parameter adjustment)."""

    id = "scale"
    function_preserving = True
    description = "Multiply every channel by a random positive factor and compensate (the model computes the same)."
    paper = "GR Table 5; HufuNet Table 6 (parameter adjustment)"
    params = (
        Param("low", 0.25, "Smallest factor (factors are log-uniform in [low, high]).", float),
        Param("high", 4.0, "Largest factor.", float),
        Param("before_norm", True, "Scale the convolution's own rows, absorbed by the batch-norm after it (true), "
              "or the batch-norm's output, divided out of the next layer's inputs (false).", bool),
    )  # fmt: skip

    def edit(self, graph: LayerGraph, tensors: Tensors, options: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        """Scale."""
        from auditor.toolkit import edits

        low, high = options["low"], options["high"]
        if not 0 < low <= high:
            raise UsageError(f"scale factors need 0 < low <= high, not low={low}, high={high}")
        before = options["before_norm"]
        result = edits.scale(graph, tensors, seed=options["seed"], low=low, high=high, before_norm=before)
        return result, {"where": "before batch-norm" if options["before_norm"] else "after batch-norm"}


class SignFlip(_ChannelAttack):
    """A random fraction of the channels negated through the batch-norm after them."""

    id = "sign-flip"
    function_preserving = True
    description = "Negate random channels together with the batch-norm after them (the model computes the same)."
    paper = "restore spec: sign flip through batch-norm (GR reads it as inverted bits)"
    params = (Param("fraction", 0.5, "Fraction of each layer's channels to negate.", float),)

    def edit(self, graph: LayerGraph, tensors: Tensors, options: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        """Negate."""
        from auditor.toolkit import edits

        return edits.negate(graph, tensors, seed=options["seed"], fraction=options["fraction"]), {}


class ChannelExpansion(_ChannelAttack):
    """Extra output channels for one layer whose readers' weights are zero (the HufuNet paper, Appendix B)."""

    id = "expand"
    function_preserving = True
    description = "Add output channels to a layer with zero weights in the next layer (the model computes the same)."
    paper = "HufuNet section 5.4 and Appendix B (channel expansion, A_inc * B_inc = 0)"
    params = (
        Param("layer", None, "The layer to widen (default: one chosen at random with the seed)."),
        Param("extra", 0, "Channels to add (default 0: as many as it has, doubling it).", int),
    )

    def edit(self, graph: LayerGraph, tensors: Tensors, options: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        """Expand one space."""
        import torch

        from auditor.toolkit import edits

        producers = [sp.producers[0] for sp in edits.free_spaces(graph)]
        layer = options["layer"]
        if layer is None:
            gen = torch.Generator().manual_seed(options["seed"])
            layer = producers[int(torch.randint(len(producers), (1,), generator=gen))]
        space = next((sp for sp in edits.free_spaces(graph) if layer in sp.producers), None)
        if space is None:
            raise UsageError(f"cannot widen {layer!r}: layers that can be widened: {', '.join(producers)}")
        extra = options["extra"] or space.width
        return edits.expand(graph, tensors, layer, extra, seed=options["seed"]), {"layer": layer, "added": extra}


class CutOff(_ChannelAttack):
    """A random fraction of every free space's channels removed (kernels cut-off)."""

    id = "cut-off"
    description = "Remove a random fraction of every layer's output channels and its readers' inputs."
    paper = "HufuNet Table 4 (kernels cut-off, 2.3%-6.75% of the kernels)"
    params = (Param("fraction", 0.05, "Fraction of each layer's channels to remove (at least one).", float),)

    def edit(self, graph: LayerGraph, tensors: Tensors, options: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        """Cut off."""
        from auditor.toolkit import edits

        if not 0 < options["fraction"] < 1:
            raise UsageError(f"the fraction must be between 0 and 1, not {options['fraction']}")
        result, removed = edits.cut_off(graph, tensors, options["fraction"], seed=options["seed"])
        return result, {"removed": removed}


class Supplement(_ChannelAttack):
    """New channels in every free space that the next layer reads with random weights (kernels supplement)."""

    id = "supplement"
    description = "Add random output channels to every layer, read by the next layer with random weights."
    paper = "HufuNet section 5.3 (kernels supplement)"
    params = (
        Param("fraction", 0.05, "Channels to add per layer, as a fraction of its width (at least one).", float),
        Param("strength", 1.0, "The new input weights' spread, relative to the reader's existing weights.", float),
    )

    def edit(self, graph: LayerGraph, tensors: Tensors, options: dict[str, Any]) -> tuple[Tensors, dict[str, Any]]:
        """Expand every space and give the readers non-zero weights for the new channels."""
        import torch

        from auditor.toolkit import edits
        from auditor.toolkit.channels import graph_with_tensors, input_params

        if not 0 < options["fraction"] < 1:
            raise UsageError(f"the fraction must be between 0 and 1, not {options['fraction']}")
        gen = torch.Generator().manual_seed(options["seed"])
        added: dict[str, int] = {}
        for producer in [sp.producers[0] for sp in edits.free_spaces(graph)]:
            space = next(sp for sp in edits.free_spaces(graph) if producer in sp.producers)
            k = max(1, round(options["fraction"] * space.width))
            tensors = edits.expand(graph, tensors, producer, k, seed=options["seed"] + len(added))
            for consumer in space.consumers:
                for role in input_params(graph.layer(consumer.layer)):
                    t = tensors[consumer.layer][role].clone()
                    new = slice(consumer.offset + space.width * consumer.block,
                                consumer.offset + (space.width + k) * consumer.block)  # fmt: skip
                    spread = float(t.std()) * options["strength"]
                    t[:, new] = torch.randn(t[:, new].shape, generator=gen) * spread
                    tensors[consumer.layer][role] = t
            graph = graph_with_tensors(graph, tensors)  # the next space sees the new widths
            added[producer] = k
        return tensors, {"added": added}


#: Largest logit change ``factor-linear`` accepts before refusing to write (float32 rounding is ~1e-7).
FACTOR_TOLERANCE = 1e-4


class FactorLinear(BuiltinAttack):
    """Each chosen layer factored into ``Q^T W`` then ``Q`` (a 1x1 convolution or a square linear layer),
    ``Q`` random orthogonal, nothing nonlinear between: the same function, no channel edit undoes it.

    The new architecture is no built-in one: an ``.onnx`` output runs anywhere; a ``.safetensors`` or
    ``.pt`` output keeps the factored names (``conv1.0.weight``, ``conv1.1.weight``), which auditor
    reads and audits but cannot run, since no built-in architecture has those layers."""

    id = "factor-linear"
    function_preserving = True
    description = "Factor every convolution and linear layer into two with a random orthogonal map between them."
    paper = "restore v2 (issue 13): linear functionality-equivalence (LFEA, IEEE TIFS 2023)"
    params = (
        Param("layers", None, "Comma-separated module names to factor (default: every ungrouped convolution "
              "and linear layer)."),
    )  # fmt: skip

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Build the model, factor it, check its outputs on random inputs, write."""

        from auditor.toolkit import edits
        from auditor.toolkit.modelio import export_onnx, read_model, require_runnable, write_model
        from auditor.toolkit.recognise import Runnable

        source = read_model(model)
        found = require_runnable(source.state_dict(), model_factory=options["model_factory"], why="factor-linear")
        layers = [n.strip() for n in options["layers"].split(",") if n.strip()] if options["layers"] else None
        factored, names = edits.factor_linear(found.module, seed=options["seed"], layers=layers)
        factored.eval()
        change = require_same_function(model, found, factored, seed=options["seed"], tolerance=FACTOR_TOLERANCE)
        if out.suffix.lower() == ".onnx":
            export_onnx(Runnable(factored, found.name, found.input_shape, input_dtype=found.input_dtype), out)
        else:
            write_model(factored.state_dict(), out)
        return {"model": found.name, "factored": names, "max_output_change": change}
