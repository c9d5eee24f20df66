"""Layer graphs for files that hold named tensors but no computation graph.

PyTorch state dicts, TorchScript parameters and safetensors files are flat
``name -> tensor`` maps. Keys are grouped into layers by module prefix
(``layer1.0.conv1.weight`` -> layer ``layer1.0.conv1``, role ``weight``) in
file order; each layer's kind comes from its parameter names and shapes
(or from a hint, when the file records module types, as TorchScript does);
edges are inferred where consecutive layers' widths agree, and marked
inferred.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from auditor.graph import Edge, EdgeSource, Layer, LayerGraph, LayerKind, TensorRef

__all__ = ["graph_from_tensors", "infer_kind", "split_key"]

_RECURRENT = re.compile(r"^(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")


def split_key(key: str) -> tuple[str, str]:
    """``(module, role)`` of a state-dict key: the last dotted part is the role."""
    module, dot, role = key.rpartition(".")
    return (module, role) if dot else (key, key)


def infer_kind(module: str, params: Mapping[str, TensorRef]) -> tuple[LayerKind, dict[str, Any]]:
    """A layer's kind and the attributes its parameters imply, from names and shapes alone."""
    attrs: dict[str, Any] = {}
    name = module.lower()
    if "weight_ih_l0" in params and "weight_hh_l0" in params:
        hidden = params["weight_hh_l0"].shape[1] if len(params["weight_hh_l0"].shape) == 2 else None
        ih_shape = params["weight_ih_l0"].shape
        rows = ih_shape[0] if ih_shape else None
        attrs["num_layers"] = len({m.group(3) for k in params if (m := _RECURRENT.match(k))})
        attrs["bidirectional"] = any(k.endswith("_reverse") for k in params)
        if hidden:
            attrs["hidden_size"] = hidden
            if rows == 4 * hidden:
                return LayerKind.LSTM, attrs
            if rows == 3 * hidden:
                return LayerKind.GRU, attrs
        return LayerKind.OTHER, attrs
    weight = params.get("weight")
    if "running_mean" in params and "running_var" in params:
        return LayerKind.BATCH_NORM, attrs
    if weight is None:
        return LayerKind.OTHER, attrs
    ndim = len(weight.shape)
    if ndim == 4:
        return LayerKind.CONV2D, attrs
    if ndim == 3:
        return LayerKind.CONV1D, attrs
    if ndim == 2:
        if "emb" in name and "bias" not in params:
            return LayerKind.EMBEDDING, attrs
        return LayerKind.LINEAR, attrs
    if ndim == 1:
        last = name.rsplit(".", 1)[-1]
        if "bn" in last or "batchnorm" in last or "batch_norm" in last:
            return LayerKind.BATCH_NORM, attrs
        return LayerKind.LAYER_NORM, attrs
    return LayerKind.OTHER, attrs


def _chain_edge(a: Layer, b: Layer) -> Edge | None:
    """An inferred edge a -> b when b can consume a's output, setting b's inferred groups."""
    out = a.out_channels
    if not out:  # unknown, or a zero-width layer that feeds nothing
        return None
    if b.kind in (LayerKind.LSTM, LayerKind.GRU):  # recurrent layers have no plain "weight"
        return Edge(a.name, b.name, (), 0, EdgeSource.INFERRED) if b.in_channels == out else None
    w = b.weight
    if w is None or not w.shape:
        return None
    if b.kind in (LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.LINEAR) and len(w.shape) < 2:
        return None  # a kind hint that the shapes contradict: no edge rather than a guess
    if b.kind in (LayerKind.CONV1D, LayerKind.CONV2D):
        per_group = w.shape[1]
        if out == per_group:
            return Edge(a.name, b.name, (), 0, EdgeSource.INFERRED)
        if per_group and out % per_group == 0 and w.shape[0] % (out // per_group) == 0:
            b.attrs["groups_inferred"] = out // per_group
            return Edge(a.name, b.name, (), 0, EdgeSource.INFERRED)
        return None
    if b.kind in (LayerKind.BATCH_NORM, LayerKind.LAYER_NORM):
        return Edge(a.name, b.name, (), 0, EdgeSource.INFERRED) if w.shape[0] == out else None
    if b.kind is LayerKind.LINEAR:
        width = w.shape[1]
        if width == out:
            return Edge(a.name, b.name, (), 0, EdgeSource.INFERRED)
        if a.kind in (LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.BATCH_NORM) and width % out == 0:
            return Edge(a.name, b.name, ("Flatten",), 0, EdgeSource.INFERRED)
        return None
    return None


def graph_from_tensors(
    format_id: str,
    path: Path,
    tensors: Iterable[tuple[str, TensorRef]],
    *,
    files: list[Path],
    metadata: dict[str, Any] | None = None,
    kind_hints: Mapping[str, LayerKind] | None = None,
    notes: list[str] | None = None,
    order: str = "file order",
) -> LayerGraph:
    """A graph from named tensors in the order given; ``kind_hints`` maps module names to known kinds.

    ``order`` says, for the graph's notes, what that order is (``file order``
    unless the loader sorted the tensors)."""
    modules: dict[str, dict[str, TensorRef]] = {}
    for key, ref in tensors:
        module, role = split_key(key)
        modules.setdefault(module, {})[role] = ref
    layers: list[Layer] = []
    for module, params in modules.items():
        kind, attrs = infer_kind(module, params)
        hint = (kind_hints or {}).get(module)
        if hint is not None:
            kind = hint
        else:
            attrs["kind_inferred"] = True
        layers.append(Layer(name=module, kind=kind, params=params, attrs=attrs, source=module))
    edges: list[Edge] = []
    main = [layer for layer in layers if layer.kind is not LayerKind.OTHER]
    for a, b in itertools.pairwise(main):
        edge = _chain_edge(a, b)
        if edge is not None:
            edges.append(edge)
    graph = LayerGraph(
        format=format_id,
        path=path,
        layers=layers,
        edges=edges,
        edge_source=EdgeSource.INFERRED if edges else EdgeSource.ABSENT,
        files=files,
        metadata=dict(metadata or {}),
        notes=list(notes or []),
    )
    graph.notes.append(
        f"the file holds no computation graph: layers are in {order}, kinds come from parameter names and shapes, "
        + ("edges are inferred from matching widths" if edges else "and no edges could be inferred")
    )
    return graph
