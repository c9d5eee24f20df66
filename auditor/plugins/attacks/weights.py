"""Attacks on weight values alone: pruning, half-precision casts, int8 quantization.

*Weights* here are the matrices of convolution, linear and recurrent layers
(roles starting with ``weight``, two or more dimensions): what both
watermarks live in and what pruning papers prune. Biases, batch-norm
parameters and running statistics are left alone, except by the casts, which
convert every floating tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from auditor.errors import UsageError
from auditor.graph import LayerKind, torch_dtype
from auditor.toolkit.attack import BuiltinAttack, Param

if TYPE_CHECKING:  # torch and the model I/O load when an attack runs, not when it registers
    from auditor.toolkit.channels import Tensors
    from auditor.toolkit.modelio import Source

__all__ = [
    "Bf16Cast",
    "ChannelPruning",
    "Fp16Cast",
    "Int8Quantization",
    "MagnitudePruning",
    "RandomPruning",
    "magnitude_prune",
    "weight_roles",
]

_WEIGHTED = (LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.LINEAR, LayerKind.LSTM, LayerKind.GRU)
_CONV = (LayerKind.CONV1D, LayerKind.CONV2D)
_RATE = Param("rate", 0.5, "Fraction of the weights to set to zero (0 to 1).", float)
_LAYERS = Param("layers", None, "Only these layers, comma-separated (default: every layer with weights).")


def weight_roles(source: Source, layers: str | None = None,
                 kinds: tuple[LayerKind, ...] = _WEIGHTED) -> list[tuple[str, str]]:  # fmt: skip
    """``(layer, role)`` of every weight matrix of the given kinds, in graph order (``layers``: a subset)."""
    wanted = {n.strip() for n in layers.split(",") if n.strip()} if layers else None
    found = [
        (layer.name, role)
        for layer in source.graph.layers
        if layer.kind in kinds and (wanted is None or layer.name in wanted)
        for role, ref in layer.params.items()
        if role.startswith("weight") and len(ref.shape) >= 2
    ]
    if wanted is not None and (missing := wanted - {name for name, _ in found}):
        raise UsageError(f"no weights to attack in layer(s) {', '.join(sorted(missing))}")
    if not found:
        what = "convolution" if set(kinds) <= set(_CONV) else "convolution, linear or recurrent"
        raise UsageError(f"{source.path}: the model has no {what} weights to attack")
    return found


def _check_rate(rate: float) -> float:
    if not 0.0 <= rate <= 1.0:
        raise UsageError(f"the rate must be between 0 and 1, not {rate}")
    return rate


def _copy(tensors: Tensors) -> Tensors:
    return {name: dict(params) for name, params in tensors.items()}


def magnitude_prune(tensors: Tensors, targets: list[tuple[str, str]], rate: float, *, scope: str) -> Tensors:
    """The ``rate`` smallest-|w| weights set to zero, over all ``targets`` at once (``global``) or in
    each (``layer``); exactly ``round(rate * n)`` of them, ties broken by position."""
    import torch

    out = _copy(tensors)
    groups = [targets] if scope == "global" else [[t] for t in targets]
    for group in groups:
        flat = torch.cat([out[n][r].flatten() for n, r in group])
        k = round(rate * flat.numel())
        if not k:
            continue
        flat = flat.clone()
        flat[torch.argsort(flat.abs(), stable=True)[:k]] = 0.0
        start = 0
        for n, r in group:
            t = out[n][r]
            out[n][r] = flat[start : start + t.numel()].reshape(t.shape)
            start += t.numel()
    return out


def _zeros(tensors: Tensors, targets: list[tuple[str, str]]) -> dict[str, float]:
    return {f"{n}.{r}": round(float((tensors[n][r] == 0).float().mean()), 6) for n, r in targets}


class MagnitudePruning(BuiltinAttack):
    """The smallest-magnitude weights set to zero, globally or layer by layer."""

    id = "prune-magnitude"
    description = "Magnitude pruning: the smallest |w| set to zero, over the whole model or per layer (10%-90%)."
    paper = "GR Fig. 4 (l1 pruning); HufuNet Table 3 (10%-90% by absolute value)"
    params = (_RATE, Param("scope", "global", "global: one threshold for all weights; layer: each layer alike.",
                           choices=("global", "layer")), _LAYERS)  # fmt: skip

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Prune and write."""
        from auditor.toolkit.modelio import read_model, save

        source = read_model(model)
        targets = weight_roles(source, options["layers"])
        pruned = magnitude_prune(source.tensors, targets, _check_rate(options["rate"]), scope=options["scope"])
        save(source, pruned, out, model_factory=options["model_factory"])
        return {"zero_fraction": _zeros(pruned, targets)}


class RandomPruning(BuiltinAttack):
    """A random ``rate`` of each layer's weights set to zero."""

    id = "prune-random"
    description = "Random pruning: a seeded random fraction of each layer's weights set to zero."
    paper = "a baseline for magnitude pruning (neither paper: it costs the thief far more accuracy)"
    params = (_RATE, _LAYERS)

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Prune and write."""
        import torch

        from auditor.toolkit.modelio import read_model, save

        source = read_model(model)
        targets = weight_roles(source, options["layers"])
        rate = _check_rate(options["rate"])
        gen = torch.Generator().manual_seed(options["seed"])
        pruned = _copy(source.tensors)
        for n, r in targets:
            t = pruned[n][r].flatten().clone()
            t[torch.randperm(t.numel(), generator=gen)[: round(rate * t.numel())]] = 0.0
            pruned[n][r] = t.reshape(pruned[n][r].shape)
        save(source, pruned, out, model_factory=options["model_factory"])
        return {"zero_fraction": _zeros(pruned, targets)}


class ChannelPruning(BuiltinAttack):
    """Structured pruning: whole filters (output channels) of each convolution with the smallest L1 norm zeroed."""

    id = "prune-channels"
    description = "Structured pruning: the filters with the smallest L1 norm in each convolution set to zero."
    paper = "structured pruning (Li et al. 2017), a stronger cousin of the kernels cut-off of HufuNet Table 4"
    params = (Param("rate", 0.25, "Fraction of each convolution's filters to zero (0 to 1).", float), _LAYERS)

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Zero the weakest filters of every convolution and write."""
        import torch

        from auditor.toolkit.modelio import read_model, save

        source = read_model(model)
        rate = _check_rate(options["rate"])
        pruned = _copy(source.tensors)
        removed: dict[str, list[int]] = {}
        for n, r in weight_roles(source, options["layers"], _CONV):
            w = pruned[n][r]
            k = round(rate * w.shape[0])
            drop = torch.argsort(w.abs().flatten(1).sum(1), stable=True)[:k]
            w = w.clone()
            w[drop] = 0.0
            pruned[n][r] = w
            removed[n] = sorted(drop.tolist())
        save(source, pruned, out, model_factory=options["model_factory"])
        return {"zeroed_filters": {n: len(v) for n, v in removed.items()}, "filters": removed}


class _Cast(BuiltinAttack):
    dtype: ClassVar[str] = "float16"  # auditor's dtype name
    suffixes = (".safetensors", ".pt")

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Convert every floating tensor and write it in the new type."""
        from auditor.toolkit.modelio import read_model, save

        source = read_model(model)
        dtype = torch_dtype(self.dtype)
        cast = {
            n: {r: t.to(dtype) if t.is_floating_point() else t for r, t in params.items()}
            for n, params in source.tensors.items()
        }
        save(source, cast, out)
        err = max(
            (float((c.float() - t).abs().max()) for n, p in source.tensors.items() for (r, t) in p.items()
             if t.is_floating_point() and t.numel() for c in (cast[n][r],)),
            default=0.0,
        )  # fmt: skip
        return {"dtype": self.dtype, "max_abs_change": err}


class Fp16Cast(_Cast):
    """Every floating tensor stored as IEEE half precision."""

    id = "cast-fp16"
    description = "Cast every floating tensor to float16 (half precision) and store it so."
    paper = "deployment casts (neither paper measures them)"
    dtype = "float16"


class Bf16Cast(_Cast):
    """Every floating tensor stored as bfloat16."""

    id = "cast-bf16"
    description = "Cast every floating tensor to bfloat16 and store it so."
    paper = "deployment casts (neither paper measures them)"
    dtype = "bfloat16"


class Int8Quantization(BuiltinAttack):
    """Symmetric linear quantization of the weights, stored dequantized (float32 values on the int8 grid)."""

    id = "quantize-int8"
    description = "Symmetric int8 weight quantization (per output channel), stored as the dequantized values."
    paper = "post-training quantization (neither paper measures it)"
    params = (
        Param("bits", 8, "Bits per weight (2 to 8): 2^(bits-1) - 1 levels each side of zero.", int),
        Param("per_channel", True, "One scale per output channel (else one per tensor).", bool),
        _LAYERS,
    )

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Round every weight to its channel's grid and write."""
        import torch

        from auditor.toolkit.modelio import read_model, save

        if not 2 <= options["bits"] <= 8:
            raise UsageError(f"bits must be from 2 to 8, not {options['bits']}")
        levels = 2 ** (options["bits"] - 1) - 1
        source = read_model(model)
        quantized = _copy(source.tensors)
        for n, r in weight_roles(source, options["layers"]):
            w = quantized[n][r]
            peak = w.abs().flatten(1).amax(1) if options["per_channel"] else w.abs().max().reshape(1)
            scale = (peak / levels).clamp_min(1e-12).reshape((-1,) + (1,) * (w.ndim - 1))
            quantized[n][r] = torch.round(w / scale).clamp(-levels, levels) * scale
        save(source, quantized, out, model_factory=options["model_factory"])
        return {"bits": options["bits"], "levels": 2 * levels + 1, "stored_as": "float32 (dequantized)"}
