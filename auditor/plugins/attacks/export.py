"""What deployment does to a model: batch-norm folded into the convolution before it, ONNX export,
integer quantization of that export.

Folding and export keep the function; dynamic quantization rounds it.
Folding changes the weights the detectors read (each output channel times
``gamma / sqrt(var + eps)``, possibly negative) and drops the batch-norm
layers; the ONNX exporters fold as well, and the legacy one renames the
folded weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.errors import UsageError
from auditor.graph import LayerGraph, LayerKind
from auditor.toolkit.attack import BuiltinAttack, Param

if TYPE_CHECKING:  # torch and the model I/O load when an attack runs, not when it registers
    from auditor.toolkit.channels import Tensors

__all__ = ["BatchNormFolding", "OnnxExport", "QuantizeDynamic", "fold_batch_norm"]

_PRODUCERS = (LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.LINEAR)


def fold_batch_norm(graph: LayerGraph, tensors: Tensors) -> tuple[Tensors, dict[str, str]]:
    """Every batch-norm that reads one producer alone (which feeds nothing else) folded into it:
    ``W' = W * g``, ``b' = beta + (b - mean) * g`` with ``g = gamma / sqrt(var + eps)`` per channel.
    Returns new tensors without the folded batch-norms, and which batch-norm went into which layer."""
    import torch

    from auditor.toolkit.channels import DEFAULT_EPS, is_pass_through

    out = {name: dict(params) for name, params in tensors.items()}
    layers = {layer.name: layer for layer in graph.layers}
    folded: dict[str, str] = {}
    for layer in graph.layers:
        if layer.kind not in _PRODUCERS or layer.name not in out:
            continue
        readers = graph.consumers(layer.name)
        if len(readers) != 1:
            continue
        bn = layers.get(readers[0].dst)
        if bn is None or bn.kind is not LayerKind.BATCH_NORM or not is_pass_through(bn) or bn.name not in out:
            continue
        if [e.src for e in graph.producers(bn.name)] != [layer.name]:
            continue
        stats = out[bn.name]
        eps = float(bn.attrs.get("eps", DEFAULT_EPS))
        g = stats["weight"].double() / torch.sqrt(stats["running_var"].double() + eps)
        w = out[layer.name]["weight"].double()
        b = out[layer.name].get("bias", torch.zeros(w.shape[0])).double()
        out[layer.name]["weight"] = (w * g.reshape((-1,) + (1,) * (w.ndim - 1))).float()
        out[layer.name]["bias"] = (stats["bias"].double() + (b - stats["running_mean"].double()) * g).float()
        del out[bn.name]
        folded[bn.name] = layer.name
    return out, folded


class BatchNormFolding(BuiltinAttack):
    """Batch-norm folded into the convolution (or linear layer) before it, as deployment tools do."""

    id = "bn-fold"
    function_preserving = True
    description = "Fold every batch-norm into the layer before it (the model computes the same)."
    paper = "restore spec: batch-norm folding (torch.onnx does it by default)"

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Fold and write."""
        from auditor.toolkit.modelio import read_model, runnable, save, working_graph

        source = read_model(model)
        module = runnable(source.state_dict(), model_factory=options["model_factory"])
        graph, edges_from = working_graph(source, module)
        tensors, folded = fold_batch_norm(graph, source.tensors)
        if not folded:
            raise UsageError(f"{model}: no batch-norm follows a convolution or linear layer alone: nothing to fold")
        save(source, tensors, out, model_factory=options["model_factory"])
        return {"edges_from": edges_from, "folded": folded}


class OnnxExport(BuiltinAttack):
    """The model exported to ONNX by torch's exporter (which folds batch-norm on the way)."""

    id = "onnx-export"
    function_preserving = True
    description = "Export to ONNX with torch.onnx (batch-norm folded; the legacy exporter renames the weights)."
    paper = "restore spec: export (the demo's thief); neither paper measures it"
    suffixes = (".onnx",)
    params = (Param("exporter", "legacy", "legacy (TorchScript-based) or dynamo.", choices=("legacy", "dynamo")),)

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Build the model, load the weights, export."""
        from auditor.toolkit.modelio import read_model, save

        source = read_model(model)
        built = save(source, source.tensors, out, model_factory=options["model_factory"], exporter=options["exporter"])
        return {"model": built.name if built is not None else None, "exporter": options["exporter"]}


class QuantizeDynamic(BuiltinAttack):
    """The model exported to ONNX, then quantized by ``onnxruntime.quantization.quantize_dynamic``:
    int8/uint8 weights in ConvInteger and MatMulInteger nodes, activations quantized at run time."""

    id = "quantize-dynamic"
    description = "Export to ONNX and quantize with onnxruntime's quantize_dynamic (ConvInteger / MatMulInteger)."
    paper = "restore v2: onnxruntime dynamic quantization (neither paper measures it)"
    suffixes = (".onnx",)
    params = (
        Param("weight_type", "int8", "Stored weight type: int8 or uint8.", choices=("int8", "uint8")),
        Param("per_channel", False, "One scale per output channel (onnxruntime applies it to MatMulInteger).", bool),
    )

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Export to a float ONNX file beside ``out``, quantize it into ``out``, remove the float file."""
        import logging
        import tempfile

        from onnxruntime.quantization import QuantType, quantize_dynamic

        from auditor.toolkit.modelio import read_model, save

        source = read_model(model)
        weight_type = QuantType.QInt8 if options["weight_type"] == "int8" else QuantType.QUInt8
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".quantize-") as work:
            exported = Path(work) / "float.onnx"
            built = save(source, source.tensors, exported, model_factory=options["model_factory"])
            quiet = logging.getLogger().level
            logging.getLogger().setLevel(logging.ERROR)  # onnxruntime warns on the root logger about pre-processing
            try:
                quantize_dynamic(exported, out, weight_type=weight_type, per_channel=options["per_channel"])
            finally:
                logging.getLogger().setLevel(quiet)
        return {
            "model": built.name if built is not None else None,
            "weight_type": options["weight_type"],
            "per_channel": options["per_channel"],
        }
