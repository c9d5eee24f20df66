"""Keyed placement of HufuNet's EPH kernels in a host (paper Algorithm 1): pure and deterministic.

A *kernel* is nine weights. In a conv weight of canonical layout
``(out, in/groups, 3, 3)`` kernel ``W[o, c]`` is the slice of nine consecutive
weights of the row-major flattening, so every eligible tensor is viewed the
same way: as consecutive groups of nine weights of its row-major flattening.
For 3x3 convolutions those groups are exactly the kernels, numbered out-major
then in. Hosts without 3x3 convolutions (linear layers, LSTM/GRU weight
matrices) are viewed the same way (the paper: "view LSTM as one convolutional
layer with N kernels, each with 3*3 parameters"); the last ``numel % 9``
weights of such a tensor belong to no kernel and never carry EPH.

Host kernels are numbered 0..N-1 over the tensors in the order given (graph
order for :meth:`HostView.from_graph`). EPH kernels are numbered i = 1..K in
:func:`kernel_message` (the paper's index), but positions and EPH rows are
0-based lists everywhere else.

Everything here depends only on the owner's EPH values, key and N: the
detector recomputes the same positions from the owner's bundle, whatever the
suspect's weights are.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from auditor.errors import UsageError
from auditor.graph import Layer, LayerGraph, LayerKind, TensorRef

__all__ = [
    "KERNEL",
    "MAX_EPH_FRACTION",
    "MIN_KEY_BYTES",
    "HostSlot",
    "HostView",
    "embed",
    "eph_kernels",
    "host_kernel_count",
    "host_refs",
    "kernel_message",
    "place",
    "position",
    "retrieve",
]

MAX_EPH_FRACTION = 0.25
"""EPH may take at most this fraction of the host's kernels (K <= N / 4).

The spec asks that EPH stay small next to the host (the paper's hosts carry it
in 1.5%-13% of their parameters). A quarter of the kernels is a generous upper
bound that still leaves linear probing short and the host mostly trainable."""

MIN_KEY_BYTES = 16
"""Shortest placement key accepted (the owner's key is 32 random bytes)."""

KERNEL = 9  # weights per kernel (3 x 3)


def _as_float32(kernel: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(kernel, torch.Tensor):
        kernel = kernel.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(kernel, dtype="<f4")


def _xor_patterns(kernels: np.ndarray) -> np.ndarray:
    """XOR of the nine float32 bit patterns of each row of a (K, 9) float32 array, as uint32."""
    return np.bitwise_xor.reduce(kernels.view("<u4"), axis=1).astype(np.uint32)


def kernel_message(kernel: torch.Tensor | np.ndarray, index: int) -> bytes:
    """The HMAC message of EPH kernel number ``index`` (1-based, the paper's i).

    The nine float32 bit patterns of the kernel, read as little-endian uint32,
    XORed together and with ``index``, written as 4 little-endian bytes. XOR
    (unlike a float sum) gives the same bytes on every machine and in every order.
    """
    values = _as_float32(kernel).reshape(-1)
    if values.size != KERNEL:
        raise UsageError(f"a kernel has {KERNEL} values (3x3), got {values.size}")
    if not 1 <= index < 2**32:
        raise UsageError(f"EPH kernel index must be in 1..2**32-1, got {index}")
    pattern = int(_xor_patterns(values.reshape(1, KERNEL))[0]) ^ index
    return pattern.to_bytes(4, "little")


def position(key: bytes, message: bytes, n: int) -> int:
    """``int.from_bytes(HMAC-SHA256(key, message), "big") % n``: a kernel's first-choice position."""
    if n < 1:
        raise UsageError(f"the host must have at least one kernel, got N = {n}")
    return int.from_bytes(hmac.new(key, message, hashlib.sha256).digest(), "big") % n


def eph_kernels(convs: Sequence[torch.Tensor]) -> torch.Tensor:
    """HufuNet's EPH as a float32 ``(K, 3, 3)`` copy: the conv weights' kernels in layer order,
    out-major then in (row ``i - 1`` is the paper's kernel i)."""
    if not convs:
        raise UsageError("EPH needs at least one convolution weight")
    parts = []
    for n, weight in enumerate(convs):
        if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
            raise UsageError(f"EPH convolution {n} has shape {tuple(weight.shape)}; HufuNet's kernels are 3x3")
        parts.append(weight.detach().to("cpu", torch.float32).reshape(-1, 3, 3))
    return torch.cat(parts).clone()


def _kernels_in(shape: Sequence[int]) -> int:
    """Kernels a tensor of this canonical shape offers; refuses shapes that are neither rule."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4 and shape[2:] == (3, 3):
        return shape[0] * shape[1]
    if len(shape) == 2:
        return (shape[0] * shape[1]) // KERNEL
    raise UsageError(
        f"cannot host EPH kernels in a tensor of shape {shape}: "
        "only 3x3 convolution weights and 2-D (linear, recurrent) weight matrices"
    )


def host_kernel_count(shapes: Iterable[Sequence[int]]) -> int:
    """N for host tensors of these canonical shapes (without reading any weight)."""
    return sum(_kernels_in(s) for s in shapes)


def _recurrent_order(role: str) -> tuple[int, int, int]:
    # PyTorch's own parameter order: layer, then direction, then ih / hh / hr.
    parts = role.split("_")  # weight, ih, l0[, reverse]
    layer = int(parts[2][1:]) if len(parts) > 2 and parts[2][1:].isdigit() else 0
    kind = {"ih": 0, "hh": 1, "hr": 2}.get(parts[1] if len(parts) > 1 else "", 3)
    return layer, int(role.endswith("_reverse")), kind


def _layer_refs(layer: Layer) -> list[tuple[str, TensorRef]]:
    if layer.kind in (LayerKind.LSTM, LayerKind.GRU):
        roles = sorted((r for r in layer.params if r.startswith("weight_")), key=_recurrent_order)
        return [(r, layer.params[r]) for r in roles if len(layer.params[r].shape) == 2]
    w = layer.weight
    if w is None:
        return []
    if layer.kind is LayerKind.CONV2D and len(w.shape) == 4 and w.shape[2:] == (3, 3):
        return [("weight", w)]
    if layer.kind is LayerKind.LINEAR and len(w.shape) == 2:
        return [("weight", w)]
    return []


def host_refs(graph: LayerGraph, names: Sequence[str] | None = None) -> list[tuple[Layer, str, TensorRef]]:
    """The host tensors of a graph as ``(layer, role, ref)``, in graph order, nothing read.

    By default: the weights of every conv2d layer with 3x3 kernels; a graph with
    none offers instead its linear weights and LSTM/GRU weight matrices (PyTorch
    order ``weight_ih_l0, weight_hh_l0, ...``), viewed as groups of nine.
    ``names`` picks layers explicitly (kept in graph order); each must offer one
    of those tensors.
    """
    if names is not None:
        unknown = [n for n in names if n not in graph]
        if unknown:
            raise UsageError(f"no layer named {', '.join(map(repr, unknown))} in the host")
        wanted = set(names)
        layers = [layer for layer in graph.layers if layer.name in wanted]
        for layer in layers:
            if not _layer_refs(layer):
                raise UsageError(
                    f"layer {layer.name!r} ({layer.kind}) cannot host EPH kernels: "
                    "only 3x3 conv2d, linear, LSTM and GRU layers can"
                )
    else:
        layers = [
            layer
            for layer in graph.of_kind(LayerKind.CONV2D)
            if layer.weight is not None and len(layer.weight.shape) == 4 and layer.weight.shape[2:] == (3, 3)
        ]
        if not layers:
            layers = graph.of_kind(LayerKind.LINEAR, LayerKind.LSTM, LayerKind.GRU)
    return [(layer, role, ref) for layer in layers for role, ref in _layer_refs(layer)]


@dataclass(frozen=True)
class HostSlot:
    """Where one host kernel lives: parameter ``param`` of layer ``layer``, weights
    ``flat_start .. flat_start + 8`` of its row-major flattening (canonical layout)."""

    layer: str
    param: str
    flat_start: int

    @property
    def name(self) -> str:
        """The parameter's state-dict name, ``layer.param`` (just ``param`` for a top-level one)."""
        return f"{self.layer}.{self.param}" if self.layer else self.param


@dataclass(frozen=True)
class _Segment:
    key: str  # the tensor's name: state-dict key, or the file's name for it
    layer: str
    param: str
    first: int  # global index of its first kernel
    count: int


def _write_groups(tensor: torch.Tensor, groups: torch.Tensor, values: torch.Tensor) -> None:
    """Write (G, 9) ``values`` into kernel groups ``groups`` of ``tensor``, in place, any strides."""
    values = values.reshape(-1, KERNEL).to(tensor.dtype)
    idx = (groups.reshape(-1, 1) * KERNEL + torch.arange(KERNEL)).reshape(-1)
    with torch.no_grad():
        if tensor.is_contiguous():
            tensor.view(-1)[idx] = values.reshape(-1)
        else:
            flat = tensor.reshape(-1).clone()
            flat[idx] = values.reshape(-1)
            tensor.copy_(flat.view(tensor.shape))


class HostView:
    """A host's weights viewed as N kernels of nine weights (see the module docstring).

    Build it with :meth:`from_tensors` (the owner's model) or :meth:`from_graph`
    (a suspect read from any file format). The view keeps the tensors it was
    given (float32 reads of a graph): :meth:`write` and :func:`embed` change
    them in place unless another state dict is named.
    """

    def __init__(self, segments: Sequence[_Segment], tensors: dict[str, torch.Tensor]) -> None:
        self._segments = list(segments)
        self.tensors = tensors
        self._starts = np.array([s.first for s in self._segments], dtype=np.int64)
        self.n = sum(s.count for s in self._segments)
        if self.n == 0:
            raise UsageError("the host offers no kernel to carry EPH")

    @classmethod
    def from_tensors(cls, named: Sequence[tuple[str, torch.Tensor]]) -> HostView:
        """A view of named tensors (``("conv2.weight", w)``...), numbered in the order given.

        4-D tensors must have 3x3 kernels; 2-D tensors are read as groups of nine.
        The tensors are kept, not copied: a view of ``model.state_dict().items()``
        writes into the model.
        """
        segments: list[_Segment] = []
        tensors: dict[str, torch.Tensor] = {}
        first = 0
        for key, tensor in named:
            if key in tensors:
                raise UsageError(f"host tensor {key!r} given twice")
            count = _kernels_in(tensor.shape)
            layer, _, param = key.rpartition(".")
            segments.append(_Segment(key, layer, param, first, count))
            tensors[key] = tensor
            first += count
        return cls(segments, tensors)

    @classmethod
    def from_graph(cls, graph: LayerGraph, names: Sequence[str] | None = None) -> HostView:
        """A view of a graph's host layers (:func:`host_refs`), read as float32 copies."""
        segments: list[_Segment] = []
        tensors: dict[str, torch.Tensor] = {}
        first = 0
        for layer, role, ref in host_refs(graph, names):
            count = _kernels_in(ref.shape)
            segments.append(_Segment(ref.name, layer.name, role, first, count))
            tensors[ref.name] = ref.read(float32=True).contiguous()
            first += count
        return cls(segments, tensors)

    @property
    def names(self) -> list[str]:
        """The tensors' names in kernel-numbering order."""
        return [seg.key for seg in self._segments]

    def _locate(self, j: int) -> tuple[_Segment, int]:
        if not 0 <= j < self.n:
            raise IndexError(f"host kernel {j} out of range 0..{self.n - 1}")
        seg = self._segments[int(np.searchsorted(self._starts, j, side="right")) - 1]
        return seg, j - seg.first

    def _by_segment(self, positions: Sequence[int]) -> list[tuple[_Segment, np.ndarray, np.ndarray]]:
        """(segment, rows into ``positions``, local kernel indices) for each segment hit."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise IndexError(f"host kernel positions must be in 0..{self.n - 1}")
        which = np.searchsorted(self._starts, pos, side="right") - 1
        out = []
        for s in np.unique(which):
            rows = np.nonzero(which == s)[0]
            seg = self._segments[int(s)]
            out.append((seg, rows, pos[rows] - seg.first))
        return out

    def slot(self, j: int) -> HostSlot:
        """Where host kernel ``j`` (0-based) lives."""
        seg, local = self._locate(j)
        return HostSlot(seg.layer, seg.param, local * KERNEL)

    def slots(self, positions: Sequence[int]) -> list[HostSlot]:
        """:meth:`slot` of each position, in order."""
        return [self.slot(int(p)) for p in positions]

    def key(self, j: int) -> str:
        """The name of the tensor holding host kernel ``j``."""
        return self._locate(j)[0].key

    def read(self, j: int) -> torch.Tensor:
        """Host kernel ``j`` as a float32 (3, 3) copy."""
        seg, local = self._locate(j)
        flat = self.tensors[seg.key].detach().reshape(-1)
        return flat[local * KERNEL : (local + 1) * KERNEL].to(torch.float32).reshape(3, 3).clone()

    def write(self, j: int, kernel: torch.Tensor, state: MutableMapping[str, torch.Tensor] | None = None) -> None:
        """Write a (3, 3) kernel at host kernel ``j`` of ``state`` (default: the view's own tensors),
        in place; ``state`` uses the same tensor names as the view."""
        seg, local = self._locate(j)
        target = (self.tensors if state is None else state)[seg.key]
        _write_groups(target, torch.tensor([local]), kernel.detach().reshape(1, KERNEL))

    def masks(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        """A bool mask per tensor hit (True on the nine weights of each position), shaped like the tensor."""
        out: dict[str, torch.Tensor] = {}
        for seg, _, local in self._by_segment(positions):
            tensor = self.tensors[seg.key]
            mask = torch.zeros(tensor.numel(), dtype=torch.bool)
            idx = (torch.from_numpy(local).reshape(-1, 1) * KERNEL + torch.arange(KERNEL)).reshape(-1)
            mask[idx] = True
            out[seg.key] = mask.reshape(tensor.shape)
        return out

    def _embed(self, eph: torch.Tensor, positions: Sequence[int], state: MutableMapping[str, torch.Tensor]) -> None:
        values = eph.detach().to("cpu", torch.float32).reshape(-1, KERNEL)
        if values.shape[0] != len(positions):
            raise UsageError(f"{values.shape[0]} EPH kernels but {len(positions)} positions")
        for seg, rows, local in self._by_segment(positions):
            _write_groups(state[seg.key], torch.from_numpy(local), values[torch.from_numpy(rows)])

    def _retrieve(self, positions: Sequence[int]) -> torch.Tensor:
        out = torch.empty(len(positions), KERNEL, dtype=torch.float32)
        for seg, rows, local in self._by_segment(positions):
            flat = self.tensors[seg.key].detach().reshape(-1)
            idx = (torch.from_numpy(local).reshape(-1, 1) * KERNEL + torch.arange(KERNEL)).reshape(-1)
            out[torch.from_numpy(rows)] = flat[idx].to(torch.float32).reshape(-1, KERNEL)
        return out.reshape(-1, 3, 3)


def place(eph: torch.Tensor, key: bytes, n: int, *, max_fraction: float = MAX_EPH_FRACTION) -> list[int]:
    """The host kernel (0-based) that carries each EPH kernel: paper Algorithm 1.

    For i = 1..K, ``p = position(key, kernel_message(eph[i - 1], i), n)``; a
    taken position is resolved by linear probing p + 1, p + 2, ... modulo N.
    ``eph`` must be the ORIGINAL EPH values (the owner's copy), never weights
    read back from a model. Refuses a host with K > N * ``max_fraction``.
    """
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(f"the placement key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
    values = _as_float32(eph.detach() if isinstance(eph, torch.Tensor) else eph)
    if values.ndim != 3 or values.shape[1:] != (3, 3):
        raise UsageError(f"EPH must have shape (K, 3, 3), got {tuple(values.shape)}")
    k = values.shape[0]
    if k == 0:
        raise UsageError("EPH has no kernel to place")
    if not 0.0 < max_fraction <= 1.0:
        raise UsageError(f"max_fraction must be in (0, 1], got {max_fraction}")
    if n < 1 or k > n * max_fraction:
        need = int(np.ceil(k / max_fraction))
        raise UsageError(
            f"host too small for EPH: {k} EPH kernels need a host of at least {need} kernels "
            f"(EPH may take at most {max_fraction:.0%} of the host's kernels), but the host has {n}"
        )
    patterns = _xor_patterns(values.reshape(k, KERNEL)) ^ np.arange(1, k + 1, dtype=np.uint32)
    taken = bytearray(n)
    positions: list[int] = []
    for pattern in patterns.tolist():
        p = position(key, int(pattern).to_bytes(4, "little"), n)
        while taken[p]:
            p = p + 1 if p + 1 < n else 0
        taken[p] = 1
        positions.append(p)
    return positions


def embed(
    host: HostView,
    eph: torch.Tensor,
    positions: Sequence[int],
    state: MutableMapping[str, torch.Tensor] | None = None,
) -> None:
    """Write EPH kernel ``r`` at host kernel ``positions[r]`` for every r, in place, into the
    host's tensors (or into ``state``, a state dict with the view's tensor names)."""
    host._embed(eph, positions, host.tensors if state is None else state)


def retrieve(host: HostView, positions: Sequence[int]) -> torch.Tensor:
    """The host's kernels at ``positions`` as a float32 ``(K, 3, 3)`` tensor (EPH, if it is there)."""
    return host._retrieve(positions)
