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
from collections.abc import Callable, Mapping

import torch
from torch import nn

from auditor.errors import UsageError
from auditor.formats.statedict import split_key
from auditor.graph import LayerGraph, LayerKind
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


# --- linear structure edits (issue 13): each keeps the function, each is a chain or a map restore undoes ---

__all__ += ["bn_between", "factor_chain", "insert_identity", "invertible_map", "linear_pairs", "random_invertible"]


def random_invertible(n: int, *, condition: float, generator: torch.Generator) -> torch.Tensor:
    """A random ``n x n`` matrix with singular values log-spaced from ``1/sqrt(condition)`` to
    ``sqrt(condition)`` (condition number ``condition``) between two random orthogonal bases, float64."""
    if condition < 1:
        raise UsageError(f"a condition number is at least 1, not {condition:g}")
    u, v = random_orthogonal(n, generator=generator), random_orthogonal(n, generator=generator)
    s = torch.logspace(-0.5, 0.5, n, base=condition, dtype=torch.float64)
    return (u * s[torch.randperm(n, generator=generator)].reshape(1, -1)) @ v.T


def _pointwise_like(layer: _Factorable, width: int, weight: torch.Tensor, bias: torch.Tensor | None) -> _Factorable:
    """A 1x1 convolution (or a linear layer) of ``layer``'s kind from ``width`` to ``weight.shape[0]``."""
    out_w = weight.shape[0]
    new: _Factorable
    if isinstance(layer, nn.Linear):
        new = nn.Linear(width, out_w, bias=bias is not None)
    else:
        new = type(layer)(width, out_w, 1, bias=bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight.reshape(tuple(new.weight.shape)).float())
        if bias is not None and new.bias is not None:
            new.bias.copy_(bias.float())
    return new


def _with_weight(layer: _Factorable, weight: torch.Tensor, bias: torch.Tensor | None) -> _Factorable:
    new = copy.deepcopy(layer)  # same kernel, stride, padding, dilation
    new.weight = nn.Parameter(weight.reshape(layer.weight.shape).float())
    new.bias = None if bias is None else nn.Parameter(bias.float())
    return new


def _replace_layers(
    model: nn.Module, layers: list[str] | None, build: Callable[[_Factorable, torch.Generator], nn.Module], seed: int
) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` whose named (default: every ungrouped convolution and linear) layers are replaced
    by ``build(layer, generator)``, in module order."""
    out = copy.deepcopy(model)
    kinds = (nn.Conv1d, nn.Conv2d, nn.Linear)
    found = {n: m for n, m in out.named_modules() if isinstance(m, kinds) and getattr(m, "groups", 1) == 1}
    names = list(found) if layers is None else list(layers)
    missing = [n for n in names if n not in found]
    if missing:
        raise UsageError(f"cannot edit {', '.join(missing)}: layers that can be edited: {', '.join(found)}")
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, attr, build(found[name], gen))
    return out, names


def _width(layer: _Factorable) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def insert_identity(model: nn.Module, *, layers: list[str] | None = None) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with an identity 1x1 convolution (or square linear layer, weights ``I``, no bias)
    after each named layer: ``conv1`` becomes ``conv1.0`` (the layer) and ``conv1.1`` (the identity)."""

    def build(layer: _Factorable, gen: torch.Generator) -> nn.Module:
        eye = torch.eye(_width(layer), dtype=torch.float64)
        return nn.Sequential(layer, _pointwise_like(layer, _width(layer), eye, None))

    return _replace_layers(model, layers, build, 0)


def bn_between(model: nn.Module, *, seed: int, layers: list[str] | None = None) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with each named layer ``W`` written as ``Q^T W`` (no bias), a batch-norm with random
    statistics and affine parameters, and a 1x1 convolution (or linear layer) ``Q diag(1/g)`` with bias
    ``b - Q (h / g)`` that undoes both (``g``, ``h``: the batch-norm's gain and shift); ``Q`` random orthogonal.
    Names ``conv1.0``, ``conv1.1`` (the batch-norm), ``conv1.2``."""

    def build(layer: _Factorable, gen: torch.Generator) -> nn.Module:
        n = _width(layer)
        q = random_orthogonal(n, generator=gen)
        w = layer.weight.detach().double()
        first = _with_weight(layer, q.T @ w.reshape(n, -1), None)
        norm = (nn.BatchNorm1d if isinstance(layer, nn.Linear | nn.Conv1d) else nn.BatchNorm2d)(n).eval()
        gamma, beta = torch.empty(n).uniform_(0.5, 2.0, generator=gen) * _signs(n, gen), torch.randn(n, generator=gen)
        mean, var = torch.randn(n, generator=gen), torch.empty(n).uniform_(0.5, 2.0, generator=gen)
        norm.load_state_dict({"weight": gamma, "bias": beta, "running_mean": mean, "running_var": var,
                              "num_batches_tracked": torch.tensor(0)})  # fmt: skip
        g = gamma.double() / torch.sqrt(var.double() + norm.eps)
        h = beta.double() - mean.double() * g
        bias = -(q @ (h / g))
        if layer.bias is not None:
            bias = bias + layer.bias.detach().double()
        return nn.Sequential(first, norm, _pointwise_like(layer, n, q / g.reshape(1, -1), bias))

    return _replace_layers(model, layers, build, seed)


def _signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)


def factor_chain(
    model: nn.Module, *, seed: int, layers: list[str] | None = None, condition: float = 10.0
) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with each named layer ``W`` factored into three linear operations: ``A W`` (``A``
    random invertible of condition number ``condition``, no bias), a 1x1 convolution (or square linear
    layer) ``Q`` (random orthogonal) and one ``(Q A)^-1`` with the original bias. Names ``.0``, ``.1``, ``.2``."""

    def build(layer: _Factorable, gen: torch.Generator) -> nn.Module:
        n = _width(layer)
        a = random_invertible(n, condition=condition, generator=gen)
        q = random_orthogonal(n, generator=gen)
        w = layer.weight.detach().double()
        bias = None if layer.bias is None else layer.bias.detach().double()
        first = _with_weight(layer, a @ w.reshape(n, -1), None)
        last = torch.linalg.inv(q @ a)
        return nn.Sequential(first, _pointwise_like(layer, n, q, None), _pointwise_like(layer, n, last, bias))

    return _replace_layers(model, layers, build, seed)


def linear_pairs(graph: LayerGraph) -> list[tuple[str, str]]:
    """The pairs ``(a, b)`` of the graph where ``a`` (an ungrouped convolution or linear layer) feeds ``b``
    alone and ``b`` reads ``a`` alone, nothing but Identity/Dropout between them, and ``b`` is a linear layer
    after a linear layer or a 1x1 convolution after a convolution: an invertible map fits between them."""
    layers = {x.name: x for x in graph.layers}
    kinds = (LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.LINEAR)
    out = []
    for a in graph.layers:
        readers = graph.consumers(a.name)
        if a.kind not in kinds or a.weight is None or len(readers) != 1 or readers[0].dst not in layers:
            continue
        b, edge = layers[readers[0].dst], readers[0]
        if b.kind is not a.kind or b.weight is None or len(graph.producers(b.name)) != 1:
            continue
        groups = [int(x.attrs.get("groups", 1)) for x in (a, b)]
        if groups != [1, 1] or edge.offset not in (0, None) or set(edge.via) - {"Identity", "Dropout"}:
            continue
        if b.in_channels == a.out_channels and all(k == 1 for k in b.weight.shape[2:]):
            out.append((a.name, b.name))
    return out


def invertible_map(
    graph: LayerGraph, tensors: Input, pairs: list[tuple[str, str]], *, seed: int, condition: float = 10.0
) -> Tensors:
    """An invertible map ``A`` (random, condition number ``condition``) and its inverse between each pair
    ``(a, b)`` of :func:`linear_pairs`: ``W_a -> A W_a``, ``b_a -> A b_a``, ``W_b -> W_b A^-1``. The model's
    names and shapes stay; what it computes stays up to rounding."""
    gen = torch.Generator().manual_seed(seed)
    out = _copy(tensors)
    for a, b in pairs:
        wa, wb = out[a]["weight"], out[b]["weight"]
        n = wa.shape[0]
        m = random_invertible(n, condition=condition, generator=gen)
        out[a] = {**out[a], "weight": (m @ wa.double().reshape(n, -1)).reshape(wa.shape).to(wa.dtype)}
        if "bias" in out[a]:
            out[a]["bias"] = (m @ out[a]["bias"].double()).to(wa.dtype)
        inv = torch.linalg.inv(m)
        flat = wb.double().reshape(wb.shape[0], n)
        out[b] = {**out[b], "weight": (flat @ inv).reshape(wb.shape).to(wb.dtype)}
    return out
