"""Reading a model file for an attack, writing the attacked model, and running a model file.

Weight attacks work on tensors: :func:`read_model` gives the file's layer graph
(read with the safe loaders) and float32 copies of its tensors by layer and
role. :func:`write_model` writes a state dict as ``.safetensors`` or ``.pt``
(``torch.save`` of plain tensors), or, given a runnable model, exports
``.onnx``. Attacks that run the network need an ``nn.Module``, which
:mod:`.recognise` finds (re-exported here).
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from auditor.audit.load import load_model
from auditor.errors import UsageError
from auditor.graph import EdgeSource, LayerGraph
from auditor.safeio import write_atomically
from auditor.toolkit.attack import SUFFIXES
from auditor.toolkit.channels import Tensors, graph_with_tensors, tensors_of
from auditor.toolkit.recognise import DIGITS_INPUT, Runnable, load_into, require_runnable, runnable

__all__ = [
    "DIGITS_INPUT",
    "SUFFIXES",
    "Runnable",
    "Source",
    "export_onnx",
    "predictor",
    "read_model",
    "read_runnable",
    "require_runnable",
    "save",
    "runnable",
    "state_dict",
    "working_graph",
    "write_model",
    "write_runnable",
]


@dataclass
class Source:
    """A model read for an attack: its graph and float32 copies of its tensors by layer and role."""

    path: Path
    graph: LayerGraph
    tensors: Tensors

    def state_dict(self, tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """``tensors`` (the source's own by default) as a flat state dict, see :func:`state_dict`."""
        return state_dict(self.graph, self.tensors if tensors is None else tensors)


def read_model(path: Path) -> Source:
    """Load ``path`` with the safe loaders (never running anything in it) and copy out its tensors."""
    graph = load_model(path)
    # Roles in name order: the random draws of an edit then do not depend on the file's tensor order.
    tensors = {name: dict(sorted(params.items())) for name, params in tensors_of(graph).items()}
    return Source(Path(path), graph, tensors)


def state_dict(graph: LayerGraph, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A flat state dict: a tensor keeps the key its state-dict file stored it under; ONNX tensors
    and new roles (a folded bias) are named ``layer.role``."""
    layers = {layer.name: layer for layer in graph.layers}
    keep_names = graph.format != "onnx"
    out: dict[str, torch.Tensor] = {}
    for name, params in tensors.items():
        for role, t in params.items():
            ref = layers[name].params.get(role) if name in layers else None
            out[ref.name if keep_names and ref is not None else f"{name}.{role}"] = t
    return out


def write_model(state: Mapping[str, torch.Tensor], out: Path, *, model: Runnable | None = None,
                exporter: str = "legacy") -> None:  # fmt: skip
    """Write ``state`` in the format ``out``'s suffix names, atomically (a temporary file renamed
    into place). ``.onnx`` needs ``model`` (its architecture), which gets ``state`` loaded first."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    suffix = out.suffix.lower()
    if suffix == ".safetensors":
        write_atomically(out, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    elif suffix == ".pt":
        write_atomically(out, lambda p: torch.save(tensors, p))
    elif suffix == ".onnx":
        if model is None:
            raise UsageError(f"{out}: writing ONNX needs a model it can run (a built-in architecture or "
                             "--model-factory)")  # fmt: skip
        load_into(model.module, tensors)
        export_onnx(model, out, exporter=exporter)
    else:
        raise UsageError(f"{out}: cannot write {suffix or 'a file without a suffix'}; use {', '.join(SUFFIXES)}")


def export_onnx(model: Runnable, out: Path, *, exporter: str = "legacy", training: bool = False) -> None:
    """Export ``model`` (a copy: export runs it) to ``out`` with a dynamic batch axis (legacy exporter)."""
    if exporter not in ("legacy", "dynamo"):
        raise UsageError(f"unknown ONNX exporter {exporter!r}; legacy or dynamo")
    module = copy.deepcopy(model.module)
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    module.train(training)
    example = (torch.zeros(2, *model.input_shape, dtype=model.input_dtype),)
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"]}
    if exporter == "legacy":
        kwargs.update(dynamo=False, training=mode, do_constant_folding=not training,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    else:
        kwargs.update(dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    # The exporters' warnings and progress chatter say nothing about the attack.
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), quiet[0], quiet[1]:
        warnings.simplefilter("ignore")

        def export(path: Path) -> None:
            torch.onnx.export(module, example, str(path), **kwargs)

        write_atomically(out, export)


def working_graph(source: Source, model: Runnable | None) -> tuple[LayerGraph, str]:
    """The source's tensors on a graph with real edges, and where those edges come from.

    An ONNX file has its own graph; a state dict whose model can be run gets the edges of an
    ONNX trace of that model (residual adds included). Otherwise the loader's edges, inferred
    from file order, are all there is: a ``.pt`` keeps module order, a safetensors file does not,
    so there it is refused."""
    if source.graph.edge_source is EdgeSource.GRAPH:
        return graph_with_tensors(source.graph, source.tensors), "the file's own graph"
    if model is not None:
        with tempfile.TemporaryDirectory(prefix="auditor-attack-") as tmp:
            traced = load_model(_traced(model, Path(tmp) / "trace.onnx"))
            if {layer.name for layer in traced.layers} == set(source.tensors):
                return graph_with_tensors(traced, source.tensors), f"an ONNX trace of the model ({model.name})"
    if source.graph.format == "safetensors":
        raise UsageError(f"{source.path}: safetensors keeps no layer order, so which layer reads which "
                         "cannot be known; name the model's code with --model-factory, or attack a .pt or .onnx "
                         "file")  # fmt: skip
    return graph_with_tensors(source.graph, source.tensors), "inferred from file order (not checked)"


def _traced(model: Runnable, path: Path) -> Path:
    # Training mode keeps batch-norm as its own node (an eval export folds it away); the copy's
    # statistics may move during the trace, but only the graph's structure is used.
    export_onnx(model, path, training=True)
    return path


def predictor(path: Path, *, model_factory: str | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function from a batch of inputs to logits for the model file ``path`` (ONNX files run in
    onnxruntime, state dicts in a recognised module), or None if it cannot be run."""
    graph = load_model(path)
    if graph.format == "onnx":
        return _onnx_runner(path)
    source = Source(Path(path), graph, tensors_of(graph))
    model = runnable(source.state_dict(), model_factory=model_factory)
    if model is None:
        return None
    module = model.module

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run


def _onnx_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    fixed = first.shape[0] if first.shape and isinstance(first.shape[0], int) else None

    def run(x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().numpy().astype(np.float32)
        step = fixed or len(arr)
        outs = [session.run(None, {first.name: arr[i : i + step]})[0] for i in range(0, len(arr), step)]
        return torch.from_numpy(np.concatenate(outs))

    return run


def save(source: Source, tensors: Mapping[str, Mapping[str, torch.Tensor]], out: Path, *,
         model_factory: str | None = None, exporter: str = "legacy") -> Runnable | None:  # fmt: skip
    """Write ``tensors`` (the source's layout) to ``out``; for ``.onnx``, through the recognised model.
    Returns that model when one was needed."""
    state = source.state_dict(tensors)
    model = None
    if out.suffix.lower() == ".onnx":
        model = require_runnable(state, model_factory=model_factory, why="writing ONNX")
    write_model(state, out, model=model, exporter=exporter)
    return model


def read_runnable(path: Path, *, model_factory: str | None, why: str) -> Runnable:
    """The model file ``path`` as a module to train further (in training mode); ``why`` names the
    attack in the error when no architecture fits."""
    found = require_runnable(read_model(path).state_dict(), model_factory=model_factory, why=why)
    found.module.train()
    return found


def write_runnable(found: Runnable, out: Path) -> None:
    """Write a trained module's weights to ``out`` (any suffix :func:`write_model` takes), in eval mode."""
    found.module.eval()
    write_model(found.module.state_dict(), out, model=found)
