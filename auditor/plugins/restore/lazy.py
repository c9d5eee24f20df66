"""A model's flat state read on demand, with edits recorded instead of applied (``restore-transformer``).

A 7-billion-parameter suspect does not fit in memory as float32 (27 GB), and restoring it only moves rows and
columns, divides factors and (when the stream is rotated) multiplies by one ``hidden x hidden`` matrix. So
:class:`LazyState` holds, per tensor, where to read it (a loader's :class:`~auditor.graph.TensorRef`, memory
mapped) and the list of edits decided for it: row and column orders, factors, a rotation, a replacement. A
tensor is read and edited when asked for, one at a time, and dropped again; the rewritten graph's tensors are
readers of the same kind (:meth:`LazyState.ref`), so the guard and the detectors that come after read them
the same way. Only small things are held: index vectors, factors, the rotation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import torch

from auditor.graph import TensorRef

__all__ = ["LazyState"]

#: Edits that compute (in float64, rounded to float32 once at the end); the rest only gather.
_ARITHMETIC = frozenset({"div_rows", "div_cols", "mul_cols", "right", "left"})


def _apply(t: torch.Tensor, edits: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    if any(op in _ARITHMETIC for op, _ in edits):
        t = t.to(torch.float64)
    for op, v in edits:
        if op == "set":
            t = v.to(t.dtype)
        elif op == "rows":
            t = t.index_select(0, v)
        elif op == "cols":
            t = t.index_select(1, v)
        elif op == "div_rows":
            t = t / (v[:, None] if t.ndim == 2 else v).to(t.dtype)
        elif op == "div_cols":
            t = t / v[None, :].to(t.dtype)
        elif op == "mul_cols":
            t = t * v[None, :].to(t.dtype)
        elif op == "right":
            t = t @ v.to(t.dtype)
        elif op == "left":
            t = v.to(t.dtype) @ t
        else:  # pragma: no cover - a programming error, not an input
            raise ValueError(f"unknown edit {op!r}")
    return t.to(torch.float32)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _read(ref: TensorRef) -> torch.Tensor:
    return ref.read(float32=True)


class _Shaped:
    """A stand-in with only a shape (for reading a layout off names and shapes)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


class LazyState(Mapping[str, torch.Tensor]):
    """``name -> float32 tensor`` read from ``sources`` on each access, with the recorded edits applied."""

    def __init__(self, sources: Mapping[str, Callable[[], torch.Tensor]], shapes: Mapping[str, tuple[int, ...]],
                 edits: Mapping[str, list[tuple[str, torch.Tensor]]] | None = None) -> None:  # fmt: skip
        self.sources = dict(sources)
        self.shapes = dict(shapes)
        self.edits: dict[str, list[tuple[str, torch.Tensor]]] = {k: list(v) for k, v in (edits or {}).items()}

    @classmethod
    def of_tensors(cls, state: Mapping[str, torch.Tensor]) -> LazyState:
        """A state over tensors already in memory (tests, small models)."""
        return cls({k: partial(_same, v) for k, v in state.items()}, {k: tuple(v.shape) for k, v in state.items()})

    @classmethod
    def of_refs(cls, refs: Mapping[str, TensorRef]) -> LazyState:
        """A state over a loaded graph's tensors, read (as float32) when asked for."""
        return cls({k: partial(_read, r) for k, r in refs.items()}, {k: r.shape for k, r in refs.items()})

    def copy(self) -> LazyState:
        """The same sources with a copy of the edits (the tensors themselves are never copied)."""
        return LazyState(self.sources, self.shapes, self.edits)

    def __getitem__(self, key: str) -> torch.Tensor:
        """The tensor with its edits, as float32: always a new tensor the caller may change (a source held in
        memory is copied; a file's is a fresh read)."""
        t = self.sources[key]()
        edits = self.edits.get(key)
        if edits:
            return _apply(t, edits)
        out = t.to(torch.float32)
        return out.clone() if out is t and getattr(self.sources[key], "func", None) is _same else out

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def __contains__(self, key: object) -> bool:
        return key in self.sources

    def edit(self, key: str, op: str, value: torch.Tensor) -> None:
        """Record ``op`` (``rows``/``cols``: a gather index; ``div_rows``/``div_cols``/``mul_cols``: factors;
        ``right``/``left``: a matrix multiplying from that side; ``set``: the new value) for ``key``."""
        if key not in self.sources:
            raise KeyError(key)
        if op == "set":
            self.edits[key] = [(op, value.detach().clone())]
        else:
            self.edits.setdefault(key, []).append((op, value.detach()))

    def changed(self, key: str) -> bool:
        """Whether any edit is recorded for ``key``."""
        return bool(self.edits.get(key))

    def ref(self, key: str, name: str, reader: Callable[[], torch.Tensor] | None = None,
            shape: tuple[int, ...] | None = None) -> TensorRef:  # fmt: skip
        """A float32 tensor reference that reads ``key`` (or calls ``reader``) with its edits when read."""
        read = reader if reader is not None else (lambda: self[key])
        return TensorRef(name, shape if shape is not None else self.shapes[key], "float32", read)

    def shaped(self) -> dict[str, Any]:
        """``name -> object with a shape``, nothing read (what :func:`~auditor.toolkit.transformers.layout_of`
        needs)."""
        return {k: _Shaped(v) for k, v in self.shapes.items()}

    def describe(self) -> dict[str, Any]:
        """How many tensors carry edits (for logs and tests)."""
        return {"tensors": len(self.sources), "edited": sum(1 for k in self.sources if self.changed(k))}
