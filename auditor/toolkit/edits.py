"""The function-preserving edits restore undoes, built on the same channel operations.

Each function takes a graph (for its channel spaces: give one with real
edges, such as an ONNX export, for a residual network) and its tensors, and
returns new tensors; nothing is changed in place. They serve the tests and
benchmarks, and are the base an attack plugin can wrap.

* :func:`permute` - every free channel space in a random order (paper Table 5);
* :func:`scale` - every channel of every free space times a random ``c > 0``,
  divided out of its readers; or, ``before_norm=True``, a producer's rows times
  ``c`` absorbed by the batch-norm's statistics (paper Table 6);
* :func:`negate` - channels negated through their batch-norm;
* :func:`expand` - extra output channels whose readers' weights are zero
  (paper Appendix B: ``A_inc * B_inc = 0``);
* :func:`cut_off` - channels removed (not function-preserving: paper Table 4);
* :func:`factor_linear` - a module's layers each split in two with a random orthogonal map between
  them (a linear chain that restore's canonical step fuses back).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from auditor.errors import UsageError
from auditor.formats.statedict import split_key
from auditor.graph import LayerGraph
from auditor.toolkit.channels import DEFAULT_EPS, Space, Tensors, apply_channel_maps, channel_spaces, input_params

__all__ = [
    "cut_off", "expand", "factor_linear", "free_spaces", "module_tensors", "negate", "permute",
    "random_orthogonal", "scale",
]  # fmt: skip

Input = Mapping[str, Mapping[str, torch.Tensor]]


def module_tensors(model: nn.Module) -> Tensors:
    """A module's state dict as the edits take it, ``{layer: {role: tensor}}``, detached copies."""
    out: Tensors = {}
    for key, value in model.state_dict().items():
        layer, role = split_key(key)
        out.setdefault(layer, {})[role] = value.detach().clone()
    return out


def free_spaces(graph: LayerGraph) -> list[Space]:
    """The spaces whose channels can move without changing the model's function."""
    return [sp for sp in channel_spaces(graph) if not sp.frozen]


def _copy(tensors: Input) -> Tensors:
    return {name: dict(params) for name, params in tensors.items()}


def _bn_after(graph: LayerGraph, space: Space, producer: str) -> str | None:
    return next((e.dst for e in graph.edges if e.src == producer and e.dst in space.passthrough), None)


def permute(graph: LayerGraph, tensors: Input, *, seed: int) -> tuple[Tensors, dict[int, torch.Tensor]]:
    """Every free space's channels in a random order; returns the tensors and the permutation per space."""
    gen = torch.Generator().manual_seed(seed)
    spaces = free_spaces(graph)
    maps = {sp.id: torch.randperm(sp.width, generator=gen) for sp in spaces}
    return apply_channel_maps(graph, tensors, spaces, maps), maps


def scale(
    graph: LayerGraph, tensors: Input, *, seed: int, low: float = 0.25, high: float = 4.0, before_norm: bool = False
) -> Tensors:
    """Every channel times a random factor in ``[low, high]`` (log-uniform), compensated (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    out = _copy(tensors)
    for sp in free_spaces(graph):
        c = torch.exp(torch.empty(sp.width).uniform_(float(torch.log(torch.tensor(low))),
                                                     float(torch.log(torch.tensor(high))), generator=gen))  # fmt: skip
        for name in sp.producers:
            bn = _bn_after(graph, sp, name)
            if before_norm:
                if bn is None:
                    continue
                _rows_through_norm(graph, out, name, bn, c)
            else:
                target, roles = (bn, ("weight", "bias")) if bn is not None else (name, ("weight", "bias"))
                for role in roles:
                    if role in out[target]:
                        t = out[target][role]
                        out[target][role] = t * c.reshape((-1,) + (1,) * (t.ndim - 1))
        if not before_norm:
            for cons in sp.consumers:
                for role in input_params(graph.layer(cons.layer)):
                    t = out[cons.layer][role]
                    div = torch.ones(t.shape[1])
                    div[cons.offset : cons.offset + sp.width * cons.block] = c.repeat_interleave(cons.block)
                    out[cons.layer][role] = t / div.reshape((1, -1) + (1,) * (t.ndim - 2))
    return out


def _rows_through_norm(graph: LayerGraph, out: Tensors, producer: str, bn: str, a: torch.Tensor) -> None:
    """The producer's rows times ``a`` (any sign), its batch-norm adjusted to compute the same."""
    eps = float(graph.layer(bn).attrs.get("eps", DEFAULT_EPS))
    p, norm = out[producer], out[bn]
    p["weight"] = p["weight"] * a.reshape((-1,) + (1,) * (p["weight"].ndim - 1))
    if "bias" in p:
        p["bias"] = p["bias"] * a
    norm["running_mean"] = norm["running_mean"] * a
    norm["running_var"] = (norm["running_var"] + eps) * a**2 - eps
    norm["weight"] = norm["weight"] * a.sign()


def negate(graph: LayerGraph, tensors: Input, *, seed: int, fraction: float = 0.5) -> Tensors:
    """A random ``fraction`` of each free space's channels negated through the batch-norm after them."""
    gen = torch.Generator().manual_seed(seed)
    out = _copy(tensors)
    for sp in free_spaces(graph):
        flip = torch.where(torch.rand(sp.width, generator=gen) < fraction, -1.0, 1.0)
        for name in sp.producers:
            bn = _bn_after(graph, sp, name)
            if bn is not None:
                _rows_through_norm(graph, out, name, bn, flip)
    return out


def expand(graph: LayerGraph, tensors: Input, producer: str, extra: int, *, seed: int) -> Tensors:
    """``extra`` new output channels of ``producer``'s space (random rows like the existing ones, random
    batch-norm parameters, zero input weights in every reader: the model computes the same)."""
    space = next((sp for sp in free_spaces(graph) if producer in sp.producers), None)
    if space is None or extra < 1:
        raise UsageError(f"cannot add {extra} channel(s) to {producer!r}: it must produce a free channel space")
    gen = torch.Generator().manual_seed(seed)
    index = torch.cat([torch.arange(space.width), torch.full((extra,), -1)])
    out = apply_channel_maps(graph, tensors, [space], {space.id: index})
    new = slice(space.width, space.width + extra)
    for name in space.producers + space.passthrough:
        for role, t in out[name].items():
            if t.ndim == 0 or role == "num_batches_tracked":
                continue
            old = t[: space.width]
            fill = old[torch.randint(0, space.width, (extra,), generator=gen)]  # plausible values, rows shuffled
            noise = torch.randn(fill.shape, generator=gen) * old.std() * (0.0 if role == "running_var" else 1.0)
            grown = t.clone()
            grown[new] = (fill + noise).abs() if role == "running_var" else fill + noise
            out[name][role] = grown
    return out


def cut_off(graph: LayerGraph, tensors: Input, fraction: float, *, seed: int) -> tuple[Tensors, dict[str, list[int]]]:
    """A random ``fraction`` of every free space's channels removed; returns the removed channels per producer."""
    gen = torch.Generator().manual_seed(seed)
    spaces = free_spaces(graph)
    maps, removed = {}, {}
    for sp in spaces:
        k = max(1, round(fraction * sp.width))
        drop = torch.randperm(sp.width, generator=gen)[:k]
        keep = torch.ones(sp.width, dtype=torch.bool)
        keep[drop] = False
        maps[sp.id] = torch.arange(sp.width)[keep]
        removed[",".join(sp.producers)] = sorted(drop.tolist())
    return apply_channel_maps(graph, tensors, spaces, maps), removed


def random_orthogonal(n: int, *, generator: torch.Generator) -> torch.Tensor:
    """A random ``n x n`` orthogonal matrix (Haar: QR of a Gaussian matrix, signs fixed), float64."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).reshape(1, -1)


_Factorable = nn.Conv1d | nn.Conv2d | nn.Linear


def _factored(layer: _Factorable, q: torch.Tensor) -> nn.Sequential:
    """``layer`` as two layers computing the same: its own shape with weights ``Q^T W`` (no bias), then a
    1x1 convolution (or a square linear layer) with weights ``Q`` and the original bias."""
    w = layer.weight.detach().double()
    first_w = (q.T @ w.reshape(w.shape[0], -1)).reshape(w.shape)
    bias = layer.bias is not None
    first = copy.deepcopy(layer)  # same kernel, stride, padding, dilation
    first.weight = nn.Parameter(first_w.float())
    first.register_parameter("bias", None)
    second: _Factorable
    if isinstance(layer, nn.Linear):
        second = nn.Linear(layer.out_features, layer.out_features, bias=bias)
    else:
        second = type(layer)(layer.out_channels, layer.out_channels, 1, bias=bias)
    with torch.no_grad():
        second.weight.copy_(q.reshape(q.shape + (1,) * (w.ndim - 2)).float())
        if layer.bias is not None and second.bias is not None:
            second.bias.copy_(layer.bias.detach())
    return nn.Sequential(first, second)


def factor_linear(model: nn.Module, *, seed: int, layers: list[str] | None = None) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with each named layer (default: every convolution and linear layer that is
    not grouped) factored into two with a random orthogonal ``Q`` between them: ``W -> Q^T W`` then ``Q``
    (a 1x1 convolution, or a square linear layer). No nonlinearity sits between the two, so the
    copy computes the same up to rounding; the state dict's names show it (``conv1.0``, ``conv1.1``).
    Returns the copy and the names factored."""
    out = copy.deepcopy(model)
    kinds = (nn.Conv1d, nn.Conv2d, nn.Linear)
    found: dict[str, _Factorable] = {
        n: m for n, m in out.named_modules() if isinstance(m, kinds) and getattr(m, "groups", 1) == 1
    }
    names = list(found) if layers is None else list(layers)
    missing = [n for n in names if n not in found]
    if missing:
        raise UsageError(f"cannot factor {', '.join(missing)}: layers that can be factored: {', '.join(found)}")
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        layer = found[name]
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        parent_name, _, attr = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, attr, _factored(layer, random_orthogonal(width, generator=gen)))
    return out, names
