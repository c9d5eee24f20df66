"""Keep the embedded EPH kernels bit-identical while the host trains, whatever the optimiser.

Two mechanisms, both needed (spec "Host training with EPH frozen"):

* gradient hooks zero the gradient at every frozen weight, so the loss never
  pushes them;
* :meth:`FrozenKernels.restore` writes the EPH values back after every
  optimiser step, because momentum, weight decay (SGD's and AdamW's) and Adam's
  running moments move weights even where the gradient is zero.

The masks and values live in the :class:`FrozenKernels` object only, never as
buffers or attributes of the model: the released state dict has exactly the
plain architecture's keys and carries no trace of the positions (the authors'
released checkpoint leaks every position through its saved masks).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import torch
from torch import nn

from auditor.errors import UsageError
from auditor.plugins.hufunet.placement import KERNEL, HostSlot, HostView

__all__ = ["FrozenKernels"]


@dataclass
class _Frozen:
    name: str
    param: nn.Parameter
    index: torch.Tensor  # flat (row-major) indices of the frozen weights
    values: torch.Tensor  # their EPH values, in the parameter's dtype
    mask: torch.Tensor  # bool, the parameter's shape, True where frozen


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch.equal calls 0.0 and -0.0 equal and NaN unequal to itself: compare the bytes
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _zero_frozen(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(mask.to(grad.device), 0)


class FrozenKernels:
    """EPH kernels frozen in a host ``nn.Module``.

    ``slots[r]`` says where EPH kernel ``r`` (row r of the ``(K, 3, 3)`` ``eph``)
    lives: a parameter of ``model`` by its ``named_parameters`` name and the
    start of its nine weights in the row-major flattening (see
    :meth:`HostView.slots`). Use it as::

        with FrozenKernels.for_host(model, host, positions, eph) as frozen:
            train(model, ..., after_step=frozen.after_step)

    :meth:`attach` (or entering the ``with``) writes EPH into the model and
    hooks the gradients; call :meth:`after_step` (or :meth:`restore`) after
    every optimiser step; :meth:`detach` (or leaving the ``with``) removes the
    hooks. Parameters must be float32 or float64: a narrower dtype cannot hold
    the float32 EPH bit-identically, and is refused.
    """

    def __init__(self, model: nn.Module, slots: Sequence[HostSlot], eph: torch.Tensor) -> None:
        values = eph.detach().to("cpu", torch.float32).reshape(-1, KERNEL)
        if values.shape[0] != len(slots):
            raise UsageError(f"{values.shape[0]} EPH kernels but {len(slots)} host slots")
        params = dict(model.named_parameters())
        grouped: dict[str, tuple[list[int], list[torch.Tensor]]] = {}
        for r, slot in enumerate(slots):
            param = params.get(slot.name)
            if param is None:
                raise UsageError(f"the host has no parameter {slot.name!r} to freeze")
            if not 0 <= slot.flat_start <= param.numel() - KERNEL:
                raise UsageError(
                    f"parameter {slot.name!r} has {param.numel()} weights: no kernel starts at {slot.flat_start}"
                )
            starts, rows = grouped.setdefault(slot.name, ([], []))
            starts.append(slot.flat_start)
            rows.append(values[r])
        self.model = model
        self._entries: list[_Frozen] = []
        for name, (starts, rows) in grouped.items():
            param = params[name]
            index = (torch.tensor(starts).reshape(-1, 1) + torch.arange(KERNEL)).reshape(-1)
            if index.unique().numel() != index.numel():
                raise UsageError(f"two EPH kernels overlap in parameter {name!r}")
            kept = torch.cat(rows).to(param.dtype)
            if not _same_bits(kept.to(torch.float32), torch.cat(rows)):
                raise UsageError(f"parameter {name!r} is {param.dtype}: it cannot hold the float32 EPH bit-identically")
            mask = torch.zeros(param.numel(), dtype=torch.bool)
            mask[index] = True
            self._entries.append(
                _Frozen(
                    name,
                    param,
                    index.to(param.device),
                    kept.to(param.device),
                    mask.reshape(param.shape).to(param.device),
                )
            )
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def for_host(cls, model: nn.Module, host: HostView, positions: Sequence[int], eph: torch.Tensor) -> FrozenKernels:
        """Freeze EPH at ``positions`` of ``host``, a view built with the model's parameter names."""
        return cls(model, host.slots(positions), eph)

    @property
    def attached(self) -> bool:
        """Whether the gradient hooks are registered."""
        return bool(self._handles)

    @property
    def names(self) -> list[str]:
        """The parameters holding EPH kernels."""
        return [e.name for e in self._entries]

    def attach(self) -> FrozenKernels:
        """Write EPH into the model and register the gradient hooks (no-op if attached)."""
        if not self._handles:
            self.restore()
            for entry in self._entries:
                self._handles.append(entry.param.register_hook(functools.partial(_zero_frozen, entry.mask)))
        return self

    def detach(self) -> None:
        """Remove the gradient hooks; the model keeps its current weights."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def restore(self) -> None:
        """Write the EPH values back into the frozen weights (after every optimiser step)."""
        with torch.no_grad():
            for entry in self._entries:
                param = entry.param
                if entry.values.device != param.device:
                    entry.index = entry.index.to(param.device)
                    entry.values = entry.values.to(param.device)
                    entry.mask = entry.mask.to(param.device)
                if param.is_contiguous():
                    param.view(-1)[entry.index] = entry.values
                else:
                    flat = param.reshape(-1).clone()
                    flat[entry.index] = entry.values
                    param.copy_(flat.view(param.shape))

    def after_step(self, model: nn.Module | None = None) -> None:
        """A training loop's after-step hook: :meth:`restore` (``model``, if given, must be the host)."""
        if model is not None and model is not self.model and getattr(model, "module", None) is not self.model:
            raise UsageError("after_step called with a model other than the one whose kernels are frozen")
        self.restore()

    __call__ = after_step

    def intact(self) -> bool:
        """Whether every frozen weight still holds its EPH value, bit for bit."""
        with torch.no_grad():
            return all(
                _same_bits(e.param.reshape(-1)[e.index.to(e.param.device)], e.values.to(e.param.device))
                for e in self._entries
            )

    def __enter__(self) -> FrozenKernels:
        return self.attach()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.detach()
