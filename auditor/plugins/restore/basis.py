"""Invertible-map alignment: the basis between two linear layers brought back to the reference's.

Where a model has two linear operations with nothing nonlinear between them
(a convolution feeding a 1x1 convolution, a linear layer feeding a linear
layer), any invertible ``A`` fits between them: ``W1' = A W1``, ``b1' = A b1``,
``W2' = W2 A^-1`` computes the same (LFEA, IEEE TIFS 2023). No permutation or
per-channel scale undoes a general ``A``; estimating it against the reference
does. Per pair of the suspect whose reference counterparts are such a pair
too, with the same shapes, ``A`` minimises

    ||A W1 - W1'||^2 / ||W1'||^2 + ||W2' A - W2||^2 / ||W2||^2

(both layers testify: the first alone is fitted exactly by any ``A`` when its
rows are short). Orthogonal ``A`` (the common case, and well conditioned) is
the orthogonal Procrustes solution, ``U V^T`` from the SVD of
``W1' W1^T / ||W1'||^2 + W2'^T W2 / ||W2||^2``; a general ``A`` solves the
Sylvester equation of the normal equations. The orthogonal fit is taken
unless the general one explains the pair clearly better. ``A`` is then
removed: ``W1 = A^-1 W1'``, ``b1 = A^-1 b1'``, ``W2 = W2' A`` (the same
function, to rounding).

The channels around the pair may have moved too (restore-basis runs before
channel alignment): its input channels permuted or scaled, its output rows
permuted, scaled or batch-norm folded. Where the pair as it stands is not
explained, the map is estimated around them: the pair's product ``W2' W1'``
is the map-free ``R W2 W1 C``, so the input channels are put in the order the
channel plan matched for the layer that feeds the pair (or the order a
removed map left on it: pairs are tried again while one more is removed; in
a file without a graph every layer of the input's width is tried, and the
best explained wins), the product's rows are matched to the reference's,
and a factor per row and per input channel is fitted (alternating least
squares); ``A`` is then estimated on the reordered, rescaled pair and
removed from the pair as it stands, leaving the channel steps their usual
work.

A pair is left alone, and the log says why, when ``A`` is a permutation
times a diagonal (the channel and scale restorers' job: they follow, and
they also handle such a map across a ReLU, where it commutes only when the
diagonal is positive), when ``A`` is ill-conditioned (condition number
above :data:`MAX_CONDITION`) or when it does not explain the pair (relative
residual above :data:`MAX_RESIDUAL` on either layer). Any other invertible
map across a nonlinearity changes the function and is out of reach.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from auditor.graph import EdgeSource, Layer, LayerGraph, TensorRef
from auditor.plugins.restore.align import align_layers
from auditor.plugins.restore.canonical import linear_link
from auditor.toolkit.channels import is_pass_through

if TYPE_CHECKING:
    from auditor.plugins.restore.plan import Plan

__all__ = ["MAX_CONDITION", "MAX_JOINT_WIDTH", "MAX_RESIDUAL", "MapFit", "align_bases", "estimate_map", "linear_pairs"]

#: A map with a larger condition number is not removed (its inverse would amplify noise).
MAX_CONDITION = 1e4
#: A map that leaves a larger relative residual on either layer does not explain the pair.
MAX_RESIDUAL = 0.3
#: An off-diagonal share below this (per row, after the largest entry) makes the map a scaled permutation.
_MONOMIAL = 0.05


@dataclasses.dataclass
class MapFit:
    """One pair's estimated map and what was done with it."""

    first: str
    second: str
    reference_first: str
    reference_second: str
    method: str
    condition: float
    residual_first: float
    residual_second: float
    acted: bool = False
    note: str = ""

    @property
    def residual(self) -> float:
        """The larger relative residual of the two layers."""
        return max(self.residual_first, self.residual_second)

    def to_log(self) -> dict[str, Any]:
        """JSON-ready form for the restore log."""
        return {
            "first": self.first, "second": self.second, "reference_first": self.reference_first,
            "reference_second": self.reference_second, "method": self.method,
            "condition": float(f"{self.condition:.4g}"), "residual": float(f"{self.residual:.3g}"),
            "residual_first": float(f"{self.residual_first:.3g}"),
            "residual_second": float(f"{self.residual_second:.3g}"), "acted": self.acted, "note": self.note,
        }  # fmt: skip


def linear_pairs(graph: LayerGraph) -> list[tuple[str, str]]:
    """The pairs ``(a, b)`` of weighted layers with nothing nonlinear between them (the links of
    :func:`~.canonical.linear_link` from one weighted layer to the next), in graph order."""
    layers = {x.name: x for x in graph.layers}
    out = []
    for a in graph.layers:
        if a.weight is None or int(a.attrs.get("groups", 1)) != 1:  # inferred groups are guesses (canonical)
            continue
        link = linear_link(graph, a, a.kind, layers)
        if link is not None and link[0].kind is a.kind and link[0].weight is not None:
            out.append((a.name, link[0].name))
    return out


def _matrices(layer: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = layer.params["weight"].read(float32=True).to(torch.float64)
    b = layer.params["bias"].read(float32=True).to(torch.float64) if "bias" in layer.params else None
    return w.reshape(w.shape[0], -1), b


def _row_residual(r: torch.Tensor, v: torch.Tensor) -> float:
    """Relative residual of ``r``'s rows against ``v``'s, each row of ``r`` matched one-to-one to a row of
    ``v`` and scaled (the output side of the second layer may be permuted, scaled or batch-norm folded:
    the channel, fold and scale restorers' job, after this one)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    rn, vn = r / r.norm(dim=1, keepdim=True).clamp_min(1e-30), v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    rows, cols = linear_sum_assignment(-np.abs((rn @ vn.T).numpy()))
    matched = v[torch.as_tensor(cols)][torch.argsort(torch.as_tensor(rows))]
    scale = (r * matched).sum(dim=1) / (matched * matched).sum(dim=1).clamp_min(1e-30)
    return float((r - scale.reshape(-1, 1) * matched).norm() / r.norm().clamp_min(1e-30))


def estimate_map(
    x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, str, float, float] | None:
    """``A`` with ``x ~ A y`` and ``z A ~ v`` up to the rows of ``v`` (suspect first ``x``, reference first
    ``y``, suspect second ``z``, reference second ``v``; float64 matrices), the method, and the two relative
    residuals; None when neither layer fixes ``A`` (see the module docstring)."""
    k = x.shape[0]
    candidates: list[tuple[torch.Tensor, str]] = []
    if x.shape[1] >= k:  # the first layer's rows fix A: x = A y
        u, _, vt = torch.linalg.svd(x @ y.T)
        candidates.append((u @ vt, "orthogonal Procrustes"))
        candidates.append((torch.linalg.lstsq(y.T, x.T).solution.T, "least squares"))
    elif k <= MAX_JOINT_WIDTH and v.shape[0] >= k:  # neither alone: both, with the second's row scales free
        candidates += _joint(x, y, z, v)
    if not candidates:
        return None
    fits = []
    for a, method in candidates:
        r1 = float((a @ y - x).norm() / x.norm().clamp_min(1e-30))
        fits.append((a, method, r1, _row_residual(z @ a, v)))
    orth, general = fits[0], fits[-1]
    # The orthogonal map is better conditioned: taken unless the general one explains the pair clearly better.
    if max(orth[2:]) <= max(1.05 * max(general[2:]), max(general[2:]) + 0.01):
        return orth
    return general


#: Largest width for which a map fixed by neither layer alone is solved jointly (k^2 unknowns).
MAX_JOINT_WIDTH = 64


def _joint(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, v: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
    """``A`` from both layers at once where neither alone fixes it (the first's rows shorter than its width,
    the second square): ``B = A^-1`` and the second layer's row scales ``e`` (a batch-norm folded into it)
    solve ``B x = y`` and ``v B = diag(e) z`` in least squares, one linear system. Then the nearest
    orthogonal map too."""
    k, m = x.shape[0], v.shape[0]
    w1, w2 = 1.0 / max(float(y.norm()), 1e-30), 1.0 / max(float(v.norm()), 1e-30)
    eye = torch.eye(k, dtype=x.dtype)
    first = torch.cat([w1 * torch.kron(x.T.contiguous(), eye), torch.zeros(x.shape[1] * k, m, dtype=x.dtype)], 1)
    scales = torch.cat([-torch.diag(z[:, c]) for c in range(k)], 0)  # column c of diag(e) z is e * z[:, c]
    second = torch.cat([w2 * torch.kron(eye, v), w2 * scales], 1)
    rhs = torch.cat([w1 * y.T.reshape(-1), torch.zeros(m * k, dtype=x.dtype)])
    solution = torch.linalg.lstsq(torch.cat([first, second], 0), rhs.reshape(-1, 1)).solution.reshape(-1)
    inverse = solution[: k * k].reshape(k, k).T  # column-major vec
    if torch.linalg.matrix_rank(inverse) < k:
        return []
    general = torch.linalg.inv(inverse)
    u, _, vt = torch.linalg.svd(general)
    return [(u @ vt, "orthogonal Procrustes (both layers)"), (general, "least squares (both layers)")]


def _feeders(graph: LayerGraph, name: str) -> list[str]:
    """The weighted layers whose output ``name`` reads, per-channel layers between looked through (the file's
    graph, or a state dict's edges guessed from file order: a wrong guess only leaves a pair unexplained)."""
    layers = {x.name: x for x in graph.layers}
    found: list[str] = []
    stack, seen = [name], {name}
    while stack:
        for e in graph.edges:
            if e.dst != stack[-1] or e.src in seen or e.src not in layers:
                continue
            seen.add(e.src)
            if is_pass_through(layers[e.src]):
                stack.insert(0, e.src)
            elif layers[e.src].weight is not None:
                found.append(e.src)
        stack.pop()
    return found


def _input_orders(
    plan: Plan, graph: LayerGraph, pair: tuple[str, str], orders: dict[str, torch.Tensor]
) -> list[torch.Tensor | None]:
    """The orders the first layer of ``pair`` may read its input channels in: for each layer that may feed
    it, the suspect's channel matched to each reference channel, by the order a removed map left on that
    layer (``orders``) or else by the channel plan's matching of its output. The feeders are the file
    graph's; where edges are only guessed (a state dict lists its layers by name, not in the order they run),
    every other layer of the input's width, the pair's product choosing among them (see align_bases); and
    the channels in place."""
    layers = {x.name: x for x in graph.layers}
    first = layers[pair[0]]
    width = first.weight.shape[1] * int(first.attrs.get("groups", 1))  # type: ignore[union-attr]  # recorded groups
    if graph.edge_source is EdgeSource.GRAPH:
        feeders = _feeders(graph, pair[0])
    else:
        feeders = [x.name for x in graph.layers if x.weight is not None and not is_pass_through(x)
                   and x.name not in pair and x.out_channels == width]  # fmt: skip
    found: list[torch.Tensor] = []
    for feeder in feeders:
        index = orders.get(feeder)
        if index is None:
            spaces = [sp for sp in plan.spaces if feeder in sp.producers]
            index = plan.maps.get(spaces[0].id) if len(spaces) == 1 else None
        if index is None or len(index) != width or bool((index < 0).any()) or len(set(index.tolist())) != width:
            continue
        if not any(torch.equal(index, f) for f in found):
            found.append(index)
    return [*found, None]  # None: in place (the model's input, or a space the plan could not match)


def _row_order(product: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``target``, the row of ``product`` matched to it one-to-one by |cosine| (Hungarian),
    and the least-squares factor of that row against the target's."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    pn = product / product.norm(dim=1, keepdim=True).clamp_min(1e-30)
    tn = target / target.norm(dim=1, keepdim=True).clamp_min(1e-30)
    rows, cols = linear_sum_assignment(-np.abs((tn @ pn.T).numpy()))
    order = torch.as_tensor(cols)[torch.argsort(torch.as_tensor(rows))]
    matched = product[order]
    return order, (matched * target).sum(dim=1) / (target * target).sum(dim=1).clamp_min(1e-30)


def _output_order(product: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor | None) -> torch.Tensor | None:
    """The order a pair's product leaves on its output (see :func:`align_bases`), inputs put in order first."""
    if product.shape != target.shape:
        return None
    if inputs is not None:
        product = product.reshape(product.shape[0], len(inputs), -1)[:, inputs].reshape(product.shape[0], -1)
    return _row_order(product, target)[0]


def _around_channels(
    x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, v: torch.Tensor, *, inputs: torch.Tensor | None, channels: int
) -> tuple[torch.Tensor, str, float, float] | None:
    """:func:`estimate_map` with the channels around the pair taken out first, through the pair's product,
    which the map leaves alone (``z A A^-1 x = R v y C``): the first layer's ``channels`` input channels put
    in the reference's order (``inputs``), then the product's rows matched one-to-one to the reference's
    ``v y`` (``R``: a permutation, scale or folded batch-norm of the space after the pair), and a factor per
    row and per input channel (``C``: input channels scaled, their readers' columns compensating) fitted by
    alternating least squares. ``x`` and ``z`` are divided by those factors and reordered before the map is
    estimated; the map found is the suspect's own (rows and columns in the suspect's order), the residuals
    those of the reordered pair. None where the rows cannot be matched."""
    k = x.shape[0]
    if not channels or x.shape[1] % channels or (inputs is not None and len(inputs) != channels):
        return None
    blocks = x.reshape(k, channels, -1)
    if inputs is not None:
        blocks = blocks[:, inputs]
    product, target = z @ blocks.reshape(k, -1), v @ y
    if product.shape != target.shape:
        return None
    m = product.shape[0]

    def per_channel(t: torch.Tensor) -> torch.Tensor:  # each input channel's columns at unit norm, for matching
        t = t.reshape(m, channels, -1)
        return (t / t.norm(dim=(0, 2), keepdim=True).clamp_min(1e-30)).reshape(m, -1)

    order, _ = _row_order(per_channel(product), per_channel(target))
    matched, ref = product[order].reshape(m, channels, -1), target.reshape(m, channels, -1)
    rows, cols = torch.ones(m, dtype=x.dtype), torch.ones(channels, dtype=x.dtype)
    for _ in range(20):
        t = ref * cols.reshape(1, -1, 1)
        rows = (matched * t).sum(dim=(1, 2)) / (t * t).sum(dim=(1, 2)).clamp_min(1e-30)
        t = ref * rows.reshape(-1, 1, 1)
        cols = (matched * t).sum(dim=(0, 2)) / (t * t).sum(dim=(0, 2)).clamp_min(1e-30)
    if bool((rows.abs() < 1e-12).any()) or bool((cols.abs() < 1e-12).any()):
        return None
    x = (blocks / cols.reshape(1, -1, 1)).reshape(k, -1)
    estimate = estimate_map(x, y, z[order] / rows.reshape(-1, 1), v)
    if estimate is None:
        return None
    a, method, r1, r2 = estimate
    return a, f"{method}, around the channel order", r1, r2


def _monomial(a: torch.Tensor) -> bool:
    """Whether ``a`` is a permutation times a diagonal (each row and column one dominant entry)."""
    mag = a.abs()
    top = mag.max(dim=1)
    share = (mag.sum(dim=1) - top.values) / top.values.clamp_min(1e-30)
    return bool((share < _MONOMIAL).all()) and len(set(top.indices.tolist())) == a.shape[0]


def _with(layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None) -> Layer:
    params = dict(layer.params)
    shape = layer.params["weight"].shape
    params["weight"] = TensorRef.from_tensor(f"{layer.name}.weight", weight.to(torch.float32).reshape(shape))
    if bias is not None:
        params["bias"] = TensorRef.from_tensor(f"{layer.name}.bias", bias.to(torch.float32))
    return dataclasses.replace(layer, params=params, attrs={**layer.attrs, "restored": "basis aligned"})


def _named(layer: Layer, name: str) -> Layer:
    if name == layer.name:
        return layer
    params = {role: TensorRef.from_tensor(f"{name}.{role}", ref.read()) for role, ref in layer.params.items()}
    return dataclasses.replace(layer, name=name, params=params)


def align_bases(
    suspect: LayerGraph, reference: LayerGraph, plan_of: Callable[[LayerGraph, LayerGraph], Plan] | None = None
) -> tuple[LayerGraph | None, list[MapFit], str]:
    """The suspect with each linear pair's invertible map removed (None when none is removed), one
    :class:`MapFit` per pair tried, and why (see the module docstring). ``plan_of`` makes the channel plan
    whose matching of the spaces around a pair is tried where the pair alone is not explained (default:
    :func:`~.plan.make_plan`)."""
    from auditor.plugins.restore.plan import make_plan

    planner = make_plan if plan_of is None else plan_of
    plan: Plan | None = None
    pairs = linear_pairs(suspect)
    if not pairs:
        return None, [], "no two linear layers with nothing nonlinear between them"
    reference_pairs = set(linear_pairs(reference))
    second_of = dict(reference_pairs)
    matched = align_layers(suspect, reference).pairs
    ref_layers = {x.name: x for x in reference.layers}
    layers = {x.name: x for x in suspect.layers}
    tried: dict[tuple[str, str], MapFit] = {}
    # The channel order a removed map leaves on its second layer's output (the pair's product, matched to
    # the reference's): the order of the space the next pair reads, which the channel plan, made before any
    # map was removed, cannot know. Pairs are tried again while one more is removed (a chain of pairs).
    orders: dict[str, torch.Tensor] = {}
    for _ in range(len(pairs)):
        progress = False
        for a, b in pairs:
            if (a, b) in tried and tried[a, b].acted:
                continue
            ra = matched.get(a)
            # The second layer is the one the reference's first feeds: the graph says so, where the pairing by
            # position and channel counts may take another 1x1 convolution (a projection shortcut).
            rb = second_of.get(ra) if ra is not None else None
            if ra is None or rb is None or (ra, rb) not in reference_pairs:
                continue  # the reference has no such pair here: nothing to align against (a chain is fused instead)
            la, lb, rla, rlb = layers[a], layers[b], ref_layers[ra], ref_layers[rb]
            if la.weight.shape != rla.weight.shape or lb.weight.shape != rlb.weight.shape:  # type: ignore[union-attr]
                why = "shapes differ from the reference's: channels added or cut, not a change of basis"
                tried[a, b] = MapFit(a, b, ra, rb, "none", float("nan"), 1.0, 1.0, note=why)
                continue
            x, bias = _matrices(la)
            z, _ = _matrices(lb)
            y, _ = _matrices(rla)
            v, _ = _matrices(rlb)
            estimate, inputs = estimate_map(x, y, z, v), None
            if estimate is None or max(estimate[2:]) > MAX_RESIDUAL:
                if plan is None:
                    plan = planner(suspect, reference)
                channels = la.weight.shape[1] * int(la.attrs.get("groups", 1))  # type: ignore[union-attr]
                for order in _input_orders(plan, suspect, (a, b), orders):
                    around = _around_channels(x, y, z, v, inputs=order, channels=channels)
                    if around is not None and (estimate is None or max(around[2:]) < max(estimate[2:])):
                        estimate, inputs = around, order
            if estimate is None:
                why = (f"neither layer fixes the map (the first's rows are shorter than its width, and {a} is wider"
                       f" than {MAX_JOINT_WIDTH} channels or the second layer narrower)")  # fmt: skip
                tried[a, b] = MapFit(a, b, ra, rb, "none", float("nan"), 1.0, 1.0, note=why + ": left alone")
                continue
            m, method, r1, r2 = estimate
            condition = float(torch.linalg.cond(m))
            fit = MapFit(a, b, ra, rb, method, condition, r1, r2)
            tried[a, b] = fit
            if _monomial(m):
                fit.note = "a permutation times a diagonal: left to restore-channels and restore-scale"
            elif condition > MAX_CONDITION:
                fit.note = f"ill-conditioned (condition number {condition:.3g} > {MAX_CONDITION:g}): left alone"
            elif fit.residual > MAX_RESIDUAL:
                fit.note = f"does not explain the pair (residual {fit.residual:.3g} > {MAX_RESIDUAL:g}): left alone"
            else:
                inv = torch.linalg.inv(m)
                layers[a] = _with(la, inv @ x, None if bias is None else inv @ bias)
                layers[b] = _with(lb, z @ m, None)
                fit.acted = progress = True
                fit.note = f"removed ({method}, condition number {condition:.3g}, residual {fit.residual:.3g})"
                if plan is not None and (order := _output_order(z @ x, v @ y, inputs)) is not None:
                    orders[b] = order
        if not progress or plan is None:
            break
    fits = [tried[p] for p in pairs if p in tried]
    if not fits:
        return None, [], "no linear pair of the suspect is one of the reference's"
    done = [f for f in fits if f.acted]
    if not done:
        return None, fits, "no invertible map removed: " + "; ".join(f"{f.first} -> {f.second}: {f.note}" for f in fits)
    note = "restore-basis: " + ", ".join(f"map between {f.first} and {f.second} removed" for f in done)
    # Each aligned layer takes its reference layer's name where that is free, so that the later restorers and
    # the detectors find it where they find the reference's.
    renames: dict[str, str] = {}
    taken = set(layers)
    for f in done:
        for name, ref in ((f.first, f.reference_first), (f.second, f.reference_second)):
            if name != ref and ref not in taken:
                renames[name] = ref
                taken.add(ref)
    out = [_named(layers[x.name], renames.get(x.name, x.name)) for x in suspect.layers]
    edges = [
        dataclasses.replace(e, src=renames.get(e.src, e.src), dst=renames.get(e.dst, e.dst)) for e in suspect.edges
    ]
    graph = dataclasses.replace(suspect, layers=out, edges=edges, files=list(suspect.files),
                                metadata=dict(suspect.metadata), notes=[*suspect.notes, note])  # fmt: skip
    return graph, fits, f"{len(done)} invertible map(s) removed"
