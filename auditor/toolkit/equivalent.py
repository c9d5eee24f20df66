"""Structural edits that keep a model's function: branches and dummy neurons.

A thief who wants no layer of the copy to look like the owner's can change
the structure itself and keep the function exactly (Yan et al., USENIX
Security 2023; restore v2 in docs/restore.md):

* :func:`split_outputs` - a convolution or linear layer computed as ``k``
  layers over groups of its output channels, outputs concatenated
  (:class:`ConcatBranches`, children ``0..k-1``: ``conv1.0.weight``, ``conv1.1.weight``);
* :func:`split_inputs` - ``k`` layers over groups of its input channels,
  outputs summed (:class:`SumBranches`; the bias stays with branch 0);
* :func:`neuron_clique` - dummy units added to a hidden layer in groups
  (cliques) whose members share one fan-in, so compute one activation, and
  whose fan-outs sum to zero, so cancel in every reader (NeuronClique);
* :func:`neuron_split` - a unit split into ``parts`` units whose fan-ins are
  positively scaled copies of its own and whose fan-outs add up to its own
  (NeuronSplit; exact through ReLU, max- and average-pooling, which commute
  with a positive factor).

The branch edits rebuild modules; the neuron edits work on a graph's channel
spaces like :mod:`.edits` (a hidden layer is a free space with one producer)
and widen the module to the new tensors. Every function returns a copy.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auditor.errors import UsageError
from auditor.graph import LayerGraph
from auditor.toolkit.channels import (
    DEFAULT_EPS,
    Space,
    Tensors,
    apply_channel_maps,
    graph_with_tensors,
    input_params,
    tensors_of,
)
from auditor.toolkit.edits import free_spaces, module_tensors

__all__ = [
    "ConcatBranches",
    "SumBranches",
    "hidden_spaces",
    "neuron_clique",
    "neuron_split",
    "split_inputs",
    "split_outputs",
    "traced_graph",
    "widened",
]

_Layer = nn.Conv1d | nn.Conv2d | nn.Linear


class ConcatBranches(nn.Module):
    """Branches computing groups of one layer's output channels, concatenated (children ``0..k-1``)."""

    def __init__(self, branches: list[nn.Module], dim: int = 1) -> None:
        super().__init__()
        for i, branch in enumerate(branches):
            self.add_module(str(i), branch)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branches' outputs side by side."""
        return torch.cat([branch(x) for branch in self.children()], dim=self.dim)


class SumBranches(nn.Module):
    """Branches each reading one group of the input channels (``sizes``), outputs summed (children ``0..k-1``)."""

    def __init__(self, branches: list[nn.Module], sizes: list[int], dim: int = 1) -> None:
        super().__init__()
        for i, branch in enumerate(branches):
            self.add_module(str(i), branch)
        self.sizes = list(sizes)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of the branches over their input groups."""
        out: torch.Tensor | None = None
        for branch, part in zip(self.children(), torch.split(x, self.sizes, dim=self.dim), strict=True):
            y = branch(part)
            out = y if out is None else out + y
        assert out is not None
        return out


def _sizes(n: int, k: int) -> list[int]:
    return [len(c) for c in torch.arange(n).tensor_split(k)]


def _like(layer: _Layer, in_features: int, out_features: int, *, bias: bool) -> _Layer:
    """A layer of ``layer``'s type and geometry with other widths."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(in_features, out_features, bias=bias)
    return type(layer)(in_features, out_features, layer.kernel_size, stride=layer.stride,  # type: ignore[arg-type]
                       padding=layer.padding, dilation=layer.dilation, bias=bias,  # type: ignore[arg-type]
                       padding_mode=layer.padding_mode)  # fmt: skip


def _layers(model: nn.Module, names: list[str] | None, ok: Any, what: str) -> dict[str, _Layer]:
    found = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear) and getattr(m, "groups", 1) == 1 and ok(m)
    }
    chosen = list(found) if names is None else list(names)
    missing = [n for n in chosen if n not in found]
    if missing or not chosen:
        raise UsageError(f"cannot {what} {', '.join(missing) or 'any layer'}: layers that can be: "
                         f"{', '.join(found) or 'none'}")  # fmt: skip
    return {n: found[n] for n in chosen}


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)


def _out(m: _Layer) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _in(m: _Layer) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def split_outputs(model: nn.Module, *, k: int = 2, layers: list[str] | None = None) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with each named layer (default: every ungrouped convolution and linear layer with
    at least ``k`` outputs) computed as ``k`` layers over consecutive groups of its output channels,
    concatenated. Returns the copy and the names split."""
    if k < 2:
        raise UsageError(f"a layer splits into at least 2 branches, not {k}")
    out = copy.deepcopy(model)
    chosen = _layers(out, layers, lambda m: _out(m) >= k, f"split into {k} output groups")
    for name, layer in chosen.items():
        w = layer.weight.detach()
        bias = layer.bias.detach() if layer.bias is not None else None
        branches: list[nn.Module] = []
        start = 0
        for size in _sizes(_out(layer), k):
            branch = _like(layer, _in(layer), size, bias=bias is not None)
            with torch.no_grad():
                branch.weight.copy_(w[start : start + size])
                if bias is not None and branch.bias is not None:
                    branch.bias.copy_(bias[start : start + size])
            branches.append(branch)
            start += size
        _replace(out, name, ConcatBranches(branches, dim=-1 if isinstance(layer, nn.Linear) else 1))
    return out, list(chosen)


def split_inputs(model: nn.Module, *, k: int = 2, layers: list[str] | None = None) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with each named layer (default: every ungrouped convolution and linear layer with
    at least ``k`` inputs) computed as ``k`` layers over consecutive groups of its input channels, summed
    (the bias, if any, in branch 0). Returns the copy and the names split."""
    if k < 2:
        raise UsageError(f"a layer splits into at least 2 branches, not {k}")
    out = copy.deepcopy(model)
    chosen = _layers(out, layers, lambda m: _in(m) >= k, f"split into {k} input groups")
    for name, layer in chosen.items():
        w = layer.weight.detach()
        sizes = _sizes(_in(layer), k)
        branches: list[nn.Module] = []
        start = 0
        for i, size in enumerate(sizes):
            with_bias = i == 0 and layer.bias is not None
            branch = _like(layer, size, _out(layer), bias=with_bias)
            with torch.no_grad():
                branch.weight.copy_(w[:, start : start + size])
                if with_bias and branch.bias is not None and layer.bias is not None:
                    branch.bias.copy_(layer.bias.detach())
            branches.append(branch)
            start += size
        _replace(out, name, SumBranches(branches, sizes, dim=-1 if isinstance(layer, nn.Linear) else 1))
    return out, list(chosen)


# --- dummy neurons --------------------------------------------------------------------------------------


def traced_graph(model: nn.Module, input_shape: tuple[int, ...]) -> LayerGraph:
    """The layer graph of an ONNX trace of ``model`` (real edges, residual adds included; batch-norm kept)."""
    from auditor.audit.load import load_model
    from auditor.toolkit.modelio import export_onnx
    from auditor.toolkit.recognise import Runnable

    with tempfile.TemporaryDirectory(prefix="auditor-equivalent-") as tmp:
        path = Path(tmp) / "trace.onnx"
        export_onnx(Runnable(model, type(model).__name__, input_shape), path, training=True)
        graph = load_model(path)
        return graph_with_tensors(graph, tensors_of(graph))  # every tensor read now: the file goes with the folder


def hidden_spaces(graph: LayerGraph) -> list[Space]:
    """The spaces a dummy unit can join: free, one convolution or linear producer, at most one per-channel
    layer after it, and readers (a hidden layer, not a residual sum nor the model's output)."""
    return [sp for sp in free_spaces(graph) if len(sp.producers) == 1 and len(sp.passthrough) <= 1 and sp.consumers]


def _space_of(graph: LayerGraph, layers: list[str] | None, what: str) -> list[Space]:
    spaces = hidden_spaces(graph)
    by_producer = {sp.producers[0]: sp for sp in spaces}
    chosen = list(by_producer) if layers is None else list(layers)
    missing = [n for n in chosen if n not in by_producer]
    if missing or not chosen:
        raise UsageError(f"cannot {what} {', '.join(missing) or 'any layer'}: hidden layers (one producer, "
                         f"read by another layer): {', '.join(by_producer) or 'none'}")  # fmt: skip
    return [by_producer[n] for n in chosen]


def widened(model: nn.Module, tensors: Tensors) -> nn.Module:
    """A copy of ``model`` with its convolutions, linear layers and batch-norms rebuilt to the widths of
    ``tensors`` (``{module: {role: tensor}}``) and the tensors loaded."""
    out = copy.deepcopy(model)
    for path, m in list(out.named_modules()):
        w = tensors.get(path, {}).get("weight")
        if w is None or tuple(getattr(m, "weight", torch.empty(0)).shape) == tuple(w.shape):
            continue
        new: nn.Module
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear) and w.ndim == m.weight.ndim:
            new = _like(m, w.shape[1], w.shape[0], bias=m.bias is not None)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) and w.ndim == 1:
            new = type(m)(w.shape[0], eps=m.eps, momentum=m.momentum)
        else:
            raise UsageError(f"cannot widen {path} ({type(m).__name__}) to {tuple(w.shape)}")
        _replace(out, path, new)
    state = {f"{layer}.{role}": t for layer, params in tensors.items() for role, t in params.items()}
    out.load_state_dict({k: v.to(out.state_dict()[k].dtype) for k, v in state.items()})
    return out.eval()


def _log_uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.exp(torch.empty(n).uniform_(float(torch.log(torch.tensor(low))), float(torch.log(torch.tensor(high))),
                                             generator=gen))  # fmt: skip


def add_cliques(graph: LayerGraph, tensors: Tensors, space: Space, dummies: int, group: int, *, seed: int) -> Tensors:
    """``dummies`` new units in ``space`` (rounded up to whole cliques of ``group``): each clique's members
    share one fan-in (a perturbed copy of a random unit's row, batch-norm entries likewise) and get random
    fan-outs that sum to zero within the clique, in every reader."""
    if group < 2 or dummies < 1:
        raise UsageError(f"a clique has at least 2 members and at least one is added, not group={group}, "
                         f"dummies={dummies}")  # fmt: skip
    cliques = -(-dummies // group)
    extra = cliques * group
    gen = torch.Generator().manual_seed(seed)
    index = torch.cat([torch.arange(space.width), torch.full((extra,), -1)])
    out = apply_channel_maps(graph, tensors, [space], {space.id: index})
    for c in range(cliques):
        members = slice(space.width + c * group, space.width + (c + 1) * group)
        donor = int(torch.randint(space.width, (1,), generator=gen))
        for name in space.producers + space.passthrough:
            for role, t in out[name].items():
                if t.ndim == 0 or role == "num_batches_tracked":
                    continue
                value = t[donor].clone()
                if role not in ("running_var", "running_mean"):
                    value = value + torch.randn(value.shape, generator=gen) * t[: space.width].std() * 0.5
                t[members] = value  # one fan-in for the whole clique
        for consumer in space.consumers:
            for role in input_params(graph.layer(consumer.layer)):
                t = out[consumer.layer][role]
                cols = [slice(consumer.offset + (space.width + c * group + j) * consumer.block,
                              consumer.offset + (space.width + c * group + j + 1) * consumer.block)
                        for j in range(group)]  # fmt: skip
                shape = t[:, cols[0]].shape
                draws = torch.randn((group, *shape), generator=gen) * t.std()
                draws = draws - draws.mean(dim=0, keepdim=True)  # the clique's fan-outs cancel
                for j, col in enumerate(cols):
                    t[:, col] = draws[j]
    return out


def split_units(graph: LayerGraph, tensors: Tensors, space: Space, units: int, parts: int, *, seed: int) -> Tensors:
    """``units`` random units of ``space`` each split into ``parts``: fan-ins scaled by positive factors
    (through the batch-norm's statistics, which then give every part the same output), fan-outs
    scaled by positive shares summing to one (divided by the part's factor where no batch-norm
    absorbs it)."""
    if parts < 2 or not 1 <= units <= space.width:
        raise UsageError(f"split 1 to {space.width} unit(s) into at least 2 parts, not units={units}, parts={parts}")
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(space.width, generator=gen)[:units].sort().values
    index = torch.cat([torch.arange(space.width), chosen.repeat(parts - 1)])
    out = apply_channel_maps(graph, tensors, [space], {space.id: index})
    n = len(index)
    a = torch.ones(n)
    share = torch.ones(n)
    for u_pos, u in enumerate(chosen.tolist()):
        slots = [u] + [space.width + p * units + u_pos for p in range(parts - 1)]
        a[slots] = _log_uniform(parts, 0.5, 2.0, gen)
        s = torch.rand(parts, generator=gen) + 0.2
        share[slots] = s / s.sum()
    (producer,) = space.producers
    norm = space.passthrough[0] if space.passthrough else None
    p = out[producer]
    p["weight"] = p["weight"] * a.reshape((-1,) + (1,) * (p["weight"].ndim - 1))
    if "bias" in p:
        p["bias"] = p["bias"] * a
    if norm is not None:  # the batch-norm gives every part the unit's own output
        eps = float(graph.layer(norm).attrs.get("eps", DEFAULT_EPS))
        bn = out[norm]
        bn["running_mean"] = bn["running_mean"] * a
        bn["running_var"] = (bn["running_var"] + eps) * a**2 - eps
        divide = share
    else:  # the part's output is its factor times the unit's (a positive factor passes a ReLU)
        divide = share / a
    for consumer in space.consumers:
        factor = divide.repeat_interleave(consumer.block)
        for role in input_params(graph.layer(consumer.layer)):
            t = out[consumer.layer][role]
            scale = torch.ones(t.shape[1])
            scale[consumer.offset : consumer.offset + len(factor)] = factor
            out[consumer.layer][role] = t * scale.reshape((1, -1) + (1,) * (t.ndim - 2))
    return out


def _neuron_edit(model: nn.Module, input_shape: tuple[int, ...], layers: list[str] | None, what: str,
                 edit: Any) -> tuple[nn.Module, dict[str, int]]:  # fmt: skip
    graph = traced_graph(model, input_shape)
    tensors = module_tensors(model)
    if {x.name for x in graph.layers} != set(tensors):
        raise UsageError(f"cannot {what}: the traced graph's layers are not the module's")
    added: dict[str, int] = {}
    for i, space in enumerate(_space_of(graph, layers, what)):
        (producer,) = space.producers
        before = tensors[producer]["weight"].shape[0]
        tensors = edit(graph, tensors, space, i)  # each edit sees the widths the earlier ones left
        added[producer] = tensors[producer]["weight"].shape[0] - before
    return widened(model, tensors), added


def neuron_clique(model: nn.Module, *, seed: int, layers: list[str] | None = None, dummies: int = 4, group: int = 2,
                  input_shape: tuple[int, ...] = (1, 8, 8)) -> tuple[nn.Module, dict[str, int]]:  # fmt: skip
    """A copy of ``model`` with ``dummies`` dummy units (whole cliques of ``group``) in each named hidden
    layer (default: every one, :func:`hidden_spaces`); returns the copy and the units added per layer."""

    def edit(graph: LayerGraph, tensors: Tensors, space: Space, i: int) -> Tensors:
        g2 = _sized(graph, tensors)
        return add_cliques(g2, tensors, _same(g2, space), dummies, group, seed=seed + i)

    return _neuron_edit(model, input_shape, layers, "add dummy units to", edit)


def neuron_split(model: nn.Module, *, seed: int, layers: list[str] | None = None, units: int = 4, parts: int = 2,
                 input_shape: tuple[int, ...] = (1, 8, 8)) -> tuple[nn.Module, dict[str, int]]:  # fmt: skip
    """A copy of ``model`` with ``units`` units of each named hidden layer (default: every one) split into
    ``parts``; returns the copy and the units added per layer."""

    def edit(graph: LayerGraph, tensors: Tensors, space: Space, i: int) -> Tensors:
        g2 = _sized(graph, tensors)
        sp = _same(g2, space)
        return split_units(g2, tensors, sp, min(units, sp.width), parts, seed=seed + i)

    return _neuron_edit(model, input_shape, layers, "split units of", edit)


def _sized(graph: LayerGraph, tensors: Tensors) -> LayerGraph:
    """``graph`` holding ``tensors`` (an earlier space's edit widened some readers)."""
    return graph_with_tensors(graph, tensors)


def _same(graph: LayerGraph, space: Space) -> Space:
    """``space`` as the channel spaces of ``graph`` now have it (consumer offsets follow earlier edits)."""
    return next(sp for sp in hidden_spaces(graph) if sp.producers == space.producers)
