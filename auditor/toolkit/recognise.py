"""Recognising which model a state dict holds, so that attacks and evaluations can run it.

The built-in architectures are recognised from the state dict's names and
shapes (any width; batch-norm folded or not; with channels cut off or added,
rebuilt layer by layer); any other model needs its ``--model-factory``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from auditor.errors import UsageError
from auditor.toolkit import models as zoo

__all__ = ["DIGITS_INPUT", "Runnable", "fold_module", "load_into", "require_runnable", "runnable"]

#: One digits image, ``(C, H, W)``.
DIGITS_INPUT = (1, 8, 8)
_BASE_WIDTH = {"cnn": ("conv1.weight", 16), "resnet": ("stem.weight", 32)}


@dataclass
class Runnable:
    """An ``nn.Module`` holding a file's weights, what it was recognised as and its input shape."""

    module: nn.Module
    name: str
    input_shape: tuple[int, ...]
    folded: bool = False
    input_dtype: torch.dtype = torch.float32


def _guess(arch: str, state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """Constructor arguments of built-in ``arch`` that would give ``state``'s shapes, or None."""
    head = state.get("head.weight")
    if head is None or head.ndim != 2:
        return None
    if arch == "lstm":
        ih, hh = state.get("lstm.weight_ih_l0"), state.get("lstm.weight_hh_l0")
        if ih is None or hh is None or ih.ndim != 2 or hh.ndim != 2:
            return None
        return {"num_classes": head.shape[0], "row_width": ih.shape[1], "hidden": hh.shape[1]}
    key, base = _BASE_WIDTH[arch]
    first = state.get(key)
    if first is None or first.ndim != 4:
        return None
    # The nearest width: a file with channels cut off or added is rebuilt layer by layer (_resize).
    width = min(max(round(first.shape[0] / base), 1), zoo.MAX_WIDTH)
    return {"num_classes": head.shape[0], "in_channels": first.shape[1], "width": width}


def _fits(module: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    own = module.state_dict()
    return own.keys() == state.keys() and all(tuple(own[k].shape) == tuple(state[k].shape) for k in own)


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``module``, each tensor converted to the module's own dtype (strict names)."""
    own = module.state_dict()
    with torch.no_grad():
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def fold_module(module: nn.Module) -> nn.Module | None:
    """A copy of ``module`` with every batch-norm folded into the convolution registered just before
    it (the built-ins' layout), or None if it has no such pair."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(module).eval()
    leaves = [(n, m) for n, m in folded.named_modules() if any(True for _ in m.parameters(recurse=False))]
    pairs = [
        (a, b) for (a, ma), (b, mb) in itertools.pairwise(leaves)
        if isinstance(ma, nn.Conv2d | nn.Conv1d) and isinstance(mb, nn.BatchNorm2d | nn.BatchNorm1d)
        and mb.num_features == ma.out_channels
    ]  # fmt: skip
    for conv, bn in pairs:
        fused = fuse_conv_bn_eval(folded.get_submodule(conv), folded.get_submodule(bn))  # type: ignore[type-var,arg-type]
        _replace(folded, conv, fused)
        _replace(folded, bn, nn.Identity())
    return folded if pairs else None


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _built(factory: Callable[[], Any]) -> Any:
    """``factory()`` with torch's global generator left as it was: the initial weights are replaced."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return factory()


def _candidates(state: Mapping[str, torch.Tensor], model_factory: str | None,
                input_shape: tuple[int, ...]) -> Iterator[Runnable]:  # fmt: skip
    if model_factory:
        from auditor.toolkit.data import load_factory

        module = _built(load_factory(model_factory))
        if not isinstance(module, nn.Module):
            raise UsageError(f"model factory {model_factory!r} returned {type(module).__name__}, not an nn.Module")
        # The owner's model runs on its own kind of input (models.declared_input), never on a guess.
        shape, dtype = zoo.declared_input(module) or (input_shape, torch.float32)
        yield Runnable(module, model_factory, shape, input_dtype=dtype)
        return
    for arch in sorted(zoo.ARCHITECTURES):
        kwargs = _guess(arch, state)
        if kwargs is None:
            continue
        try:
            module = _built(lambda: zoo.build(arch, **kwargs))  # noqa: B023 (called at once)
        except (UsageError, ValueError, RuntimeError):
            continue
        shape = (1, 8, kwargs["row_width"]) if arch == "lstm" else (kwargs["in_channels"], 8, 8)
        width = f"hidden {kwargs['hidden']}" if arch == "lstm" else f"width {kwargs['width']}"
        yield Runnable(module, f"{arch} ({width})", shape)


def runnable(state: Mapping[str, torch.Tensor], *, model_factory: str | None = None,
             input_shape: tuple[int, ...] = DIGITS_INPUT) -> Runnable | None:  # fmt: skip
    """A module holding ``state`` (eval mode): a built-in architecture (or the ``model_factory``'s
    model) whose parameter names match, plain or batch-norm folded, with layers rebuilt where
    channels were cut off or added; None if nothing fits."""
    for candidate in _candidates(state, model_factory, input_shape):
        folded = fold_module(candidate.module)
        variants = [(candidate.module, False)] + ([(folded, True)] if folded is not None else [])
        for module, is_folded in variants:
            if module.state_dict().keys() != state.keys():
                continue
            resized = not _fits(module, state)
            if resized and not _resize(module, state):
                continue
            load_into(module, state)
            name = candidate.name + (", batch-norm folded" if is_folded else "") + (", resized" if resized else "")
            return Runnable(module.eval(), name, candidate.input_shape, is_folded, candidate.input_dtype)
    return None


def _resize(module: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Rebuild the convolutions, linear layers and batch-norms whose shapes differ from ``state``'s
    (channels cut off or added); True if the module then fits ``state``."""
    for path, m in list(module.named_modules()):
        w = state.get(f"{path}.weight" if path else "weight")
        if w is None or tuple(getattr(m, "weight", torch.empty(0)).shape) == tuple(w.shape):
            continue
        new: nn.Module
        if isinstance(m, nn.Conv2d | nn.Conv1d) and w.ndim == m.weight.ndim:
            geometry: dict[str, Any] = {
                "kernel_size": m.kernel_size,
                "stride": m.stride,
                "padding": m.padding,
                "dilation": m.dilation,
                "groups": m.groups,
                "bias": m.bias is not None,
            }
            new = type(m)(w.shape[1] * m.groups, w.shape[0], **geometry)
        elif isinstance(m, nn.Linear) and w.ndim == 2:
            new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and w.ndim == 1:
            new = type(m)(w.shape[0], eps=m.eps, momentum=m.momentum)
        else:
            return False
        _replace(module, path, new)
    return _fits(module, state)


def require_runnable(state: Mapping[str, torch.Tensor], *, model_factory: str | None, why: str,
                     input_shape: tuple[int, ...] = DIGITS_INPUT) -> Runnable:  # fmt: skip
    """:func:`runnable`, or a :class:`~auditor.errors.UsageError` saying ``why`` a module is needed."""
    found = runnable(state, model_factory=model_factory, input_shape=input_shape)
    if found is not None:
        return found
    if model_factory:
        raise UsageError(f"{why}: the model factory {model_factory!r} builds a model whose parameter names or "
                         "shapes differ from the file's")  # fmt: skip
    known = ", ".join(sorted(zoo.ARCHITECTURES))
    raise UsageError(f"{why} needs to run the model, and the file is none of the built-in architectures ({known}): "
                     "name its code with --model-factory module:function")  # fmt: skip
