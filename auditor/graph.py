"""The normalised layer graph that every loader produces and every plugin reads.

A :class:`LayerGraph` is a list of parameterised :class:`Layer` objects in the
model's order, and the :class:`Edge` objects that say which layer's output
feeds which layer's input. Weights stay in the file until asked for: each
parameter is a :class:`TensorRef` that knows its canonical shape and stored
dtype and reads the values on :meth:`TensorRef.read`.

Canonical layouts, whatever the file stored:

* convolution: ``(out, in/groups, k...)`` (PyTorch's and ONNX's own layout);
* linear: ``(out, in)`` (ONNX Gemm with ``transB=0`` and MatMul store ``(in, out)``
  and are transposed on read);
* LSTM / GRU: PyTorch parameter names (``weight_ih_l0``, ``bias_hh_l0_reverse``...)
  and PyTorch gate order, ``i, f, g, o`` for LSTM and ``r, z, n`` for GRU (ONNX
  stores ``i, o, f, c`` and ``z, r, h``: the ONNX loader reorders).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.jsondata import jsonable

if TYPE_CHECKING:  # torch and numpy load on first use, so `import auditor` stays light
    import numpy as np
    import torch

__all__ = [
    "Edge",
    "EdgeSource",
    "Layer",
    "LayerGraph",
    "LayerKind",
    "Quantization",
    "TensorRef",
    "dtype_name",
    "itemsize",
    "torch_dtype",
]


class LayerKind(str, enum.Enum):
    """What a parameterised layer computes, independent of the file format."""

    CONV1D = "conv1d"
    CONV2D = "conv2d"
    LINEAR = "linear"
    BATCH_NORM = "batch-norm"
    LAYER_NORM = "layer-norm"
    EMBEDDING = "embedding"
    LSTM = "lstm"
    GRU = "gru"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


class EdgeSource(str, enum.Enum):
    """Where an edge (or a graph's set of edges) comes from."""

    GRAPH = "graph"  # read from the file's computation graph
    INFERRED = "inferred"  # guessed from file order and matching shapes
    ABSENT = "absent"  # nothing to go on: no edges at all

    def __str__(self) -> str:
        return self.value


#: Bytes per element of each dtype auditor reads, by auditor's name (torch's and numpy's names agree).
_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


def _supported(name: str) -> str:
    if name not in _ITEMSIZE:
        raise ValueError(f"unsupported dtype {name!r}")
    return name


def itemsize(name: str) -> int:
    """Bytes per element of one of auditor's dtype names (``float32``: 4)."""
    return _ITEMSIZE[_supported(name)]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of auditor's dtype names (``float32``, ``bfloat16``...)."""
    import torch

    dtype: torch.dtype = getattr(torch, _supported(name))
    return dtype


def dtype_name(dtype: torch.dtype | np.dtype[Any]) -> str:
    """auditor's name of a torch or numpy dtype."""
    import numpy as np
    import torch

    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
        if name not in _ITEMSIZE:
            raise ValueError(f"unsupported dtype {dtype}")
        return name
    name = np.dtype(dtype).name
    if name not in _ITEMSIZE:
        raise ValueError(f"unsupported dtype {name}")
    return name


@dataclass(frozen=True)
class Quantization:
    """Linear quantization of a stored integer tensor: ``real = (q - zero_point) * scale``.

    ``axis`` is the canonical-layout axis the per-channel ``scale`` runs along,
    or ``None`` for one scale for the whole tensor.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """The float32 values of the quantized tensor ``q``."""
        import numpy as np
        import torch

        scale = torch.as_tensor(np.asarray(self.scale, dtype=np.float32))
        zero = torch.as_tensor(np.asarray(self.zero_point).astype(np.float32))
        if self.axis is not None and scale.ndim == 1 and q.ndim > 0:
            shape = [1] * q.ndim
            shape[self.axis] = -1
            scale = scale.reshape(shape)
            zero = zero.reshape(shape)
        return (q.to(torch.float32) - zero) * scale


class TensorRef:
    """A parameter tensor that stays in its file until read.

    ``name`` is the key the file uses (state-dict key, initializer name);
    ``shape`` is the canonical shape (see the module docstring); ``dtype`` the
    stored dtype's name. ``reader`` returns the tensor as stored, ``transform``
    maps it to the canonical layout (a transpose, a gate reorder).
    """

    __slots__ = ("name", "shape", "dtype", "_reader", "_transform", "quantization")

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: str,
        reader: Callable[[], torch.Tensor],
        *,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        quantization: Quantization | None = None,
    ) -> None:
        _supported(dtype)
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self._reader = reader
        self._transform = transform
        self.quantization = quantization

    @classmethod
    def from_tensor(cls, name: str, tensor: torch.Tensor) -> TensorRef:
        """A reference to a tensor already in memory (tests, restorers, attacks)."""
        return cls(name, tuple(tensor.shape), dtype_name(tensor.dtype), lambda: tensor)

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the stored tensor occupies."""
        return self.numel * _ITEMSIZE[self.dtype]

    def read(self, *, float32: bool = False) -> torch.Tensor:
        """The tensor in its canonical layout.

        With ``float32=False`` it comes in the stored dtype (int8 stays int8);
        with ``float32=True`` half, bfloat16 and quantized integers are
        converted (dequantized) to float32. The result may share memory with a
        memory-mapped file opened copy-on-write: writing to it never changes
        the file.
        """
        import torch

        tensor = self._reader()
        if self._transform is not None:
            tensor = self._transform(tensor)
        if tuple(tensor.shape) != self.shape:
            raise ValueError(f"tensor {self.name!r}: read shape {tuple(tensor.shape)} but {self.shape} was declared")
        if float32:
            if self.quantization is not None:
                tensor = self.quantization.dequantize(tensor)
            elif tensor.dtype != torch.float32:
                tensor = tensor.to(torch.float32)
        return tensor

    def __repr__(self) -> str:
        q = ", quantized" if self.quantization is not None else ""
        return f"TensorRef({self.name!r}, shape={self.shape}, dtype={self.dtype}{q})"


@dataclass
class Layer:
    """One parameterised layer.

    ``name`` is the layer's name in the source (module path such as
    ``layer1.0.conv1``; for ONNX the initializer prefix or the node name).
    ``params`` maps canonical roles to tensors: ``weight``, ``bias`` for
    conv/linear/embedding/norms, ``running_mean``/``running_var`` for batch-norm,
    PyTorch names (``weight_ih_l0``...) for recurrent layers. ``attrs`` holds
    what the layer needs besides weights (``groups``, ``stride``, ``padding``,
    ``eps``, ``hidden_size``...); an attribute the file does not record is
    absent, not guessed, unless the key ends in ``_inferred``.
    """

    name: str
    kind: LayerKind
    params: dict[str, TensorRef] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def weight(self) -> TensorRef | None:
        """The ``weight`` parameter, if there is one."""
        return self.params.get("weight")

    @property
    def parameter_count(self) -> int:
        """Number of scalar parameters (buffers such as running statistics included)."""
        return sum(p.numel for p in self.params.values())

    @property
    def out_channels(self) -> int | None:
        """Output channels (conv), features (linear, norms) or ``None`` when unknown."""
        w = self.weight
        if self.kind in (LayerKind.LSTM, LayerKind.GRU):
            hidden = self.attrs.get("hidden_size")
            return None if hidden is None else int(hidden) * (2 if self.attrs.get("bidirectional") else 1)
        if w is None or not w.shape:
            return None
        if self.kind is LayerKind.EMBEDDING:
            return w.shape[1] if len(w.shape) == 2 else None
        return w.shape[0]

    @property
    def in_channels(self) -> int | None:
        """Input channels (conv: ``in/groups * groups``), features (linear) or ``None``.

        ``None`` also where the shapes contradict the kind (a hostile file may
        label a vector a convolution)."""
        if self.kind in (LayerKind.LSTM, LayerKind.GRU):
            ih = self.params.get("weight_ih_l0")
            return ih.shape[1] if ih is not None and len(ih.shape) == 2 else None
        w = self.weight
        if w is None or not w.shape:
            return None
        if self.kind in (LayerKind.BATCH_NORM, LayerKind.LAYER_NORM):
            return w.shape[0]
        if len(w.shape) < 2:
            return None
        if self.kind in (LayerKind.CONV1D, LayerKind.CONV2D):
            groups = self.attrs.get("groups", self.attrs.get("groups_inferred", 1))
            return w.shape[1] * int(groups)
        if self.kind is LayerKind.LINEAR:
            return w.shape[1]
        return None

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description without weights."""
        return {
            "name": self.name,
            "kind": self.kind.value,
            "source": self.source,
            "parameters": self.parameter_count,
            "params": {
                role: {
                    "name": t.name,
                    "shape": list(t.shape),
                    "dtype": t.dtype,
                    "quantized": t.quantization is not None,
                }
                for role, t in self.params.items()
            },
            "attrs": {k: jsonable(v) for k, v in sorted(self.attrs.items())},
        }


@dataclass(frozen=True)
class Edge:
    """Data flows from layer ``src``'s output into layer ``dst``'s input.

    ``via`` lists the parameter-free operations in between (``Relu``,
    ``MaxPool``, ``Add``, ``Concat``, ``Flatten``...). ``offset`` is the index of
    ``dst``'s input channel (or feature) at which ``src``'s first output channel
    arrives: 0 for a plain chain, the cumulative width of the earlier inputs
    after a concatenation, ``None`` where it could not be worked out. After a
    flatten, each channel arrives as a block of ``dst.in_channels / src.out_channels``
    features. ``source`` tells whether the file's graph says so or it was inferred.
    """

    src: str
    dst: str
    via: tuple[str, ...] = ()
    offset: int | None = 0
    source: EdgeSource = EdgeSource.GRAPH

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {
            "src": self.src,
            "dst": self.dst,
            "via": list(self.via),
            "offset": self.offset,
            "source": self.source.value,
        }


@dataclass
class LayerGraph:
    """A model as auditor sees it: parameterised layers, their order and data flow.

    ``format`` is the id of the format plugin that read it; ``files`` every file
    the loader read (the model file, external data, shards), in reading order;
    ``edge_source`` says whether ``edges`` come from the file's own graph, were
    inferred from order and shapes, or are absent. ``notes`` are the loader's
    remarks for the report (what it refused, converted or could not tell).
    """

    format: str
    path: Path
    layers: list[Layer] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    edge_source: EdgeSource = EdgeSource.ABSENT
    files: list[Path] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, name: str) -> Layer:
        """The layer called ``name`` (KeyError if there is none)."""
        # A scan, not a cached index: restorers replace and rename layers, and a
        # cache keyed on anything cheaper than the list itself could go stale.
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(layer.name == name for layer in self.layers)

    def consumers(self, name: str) -> list[Edge]:
        """Edges leaving layer ``name``, in graph order of their destinations."""
        return [e for e in self.edges if e.src == name]

    def producers(self, name: str) -> list[Edge]:
        """Edges entering layer ``name``."""
        return [e for e in self.edges if e.dst == name]

    def of_kind(self, *kinds: LayerKind) -> list[Layer]:
        """Layers of the given kinds, in graph order."""
        return [layer for layer in self.layers if layer.kind in kinds]

    @property
    def parameter_count(self) -> int:
        """Scalar parameters over all layers."""
        return sum(layer.parameter_count for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Stored bytes of all parameters."""
        return sum(t.nbytes for layer in self.layers for t in layer.params.values())

    def describe(self, *, lazy: bool = False) -> dict[str, Any]:
        """A JSON-ready description of the whole graph, without weights.

        With ``lazy=True``, ``layers`` and ``edges`` are iterators that describe
        one entry at a time as they are consumed, so that a graph of hundreds of
        thousands of layers can be written out without holding every
        description at once (``inspect`` does so); everything else is the same.
        """
        layers: Iterator[dict[str, Any]] = (layer.describe() for layer in self.layers)
        edges: Iterator[dict[str, Any]] = (edge.describe() for edge in self.edges)
        return {
            "format": self.format,
            "path": str(self.path),
            "files": [str(f) for f in self.files],
            "edge_source": self.edge_source.value,
            "layers": layers if lazy else list(layers),
            "edges": edges if lazy else list(edges),
            "metadata": {k: jsonable(v) for k, v in sorted(self.metadata.items())},
            "notes": list(self.notes),
            "totals": {
                "layers": len(self.layers),
                "parameters": self.parameter_count,
                "bytes": self.nbytes,
                "edges": len(self.edges),
            },
        }
