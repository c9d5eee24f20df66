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
from typing import Any

import torch

from auditor.graph import Layer, LayerGraph, TensorRef
from auditor.plugins.restore.align import align_layers
from auditor.plugins.restore.canonical import linear_link

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


def align_bases(suspect: LayerGraph, reference: LayerGraph) -> tuple[LayerGraph | None, list[MapFit], str]:
    """The suspect with each linear pair's invertible map removed (None when none is removed), one
    :class:`MapFit` per pair tried, and why (see the module docstring)."""
    pairs = linear_pairs(suspect)
    if not pairs:
        return None, [], "no two linear layers with nothing nonlinear between them"
    reference_pairs = set(linear_pairs(reference))
    second_of = dict(reference_pairs)
    matched = align_layers(suspect, reference).pairs
    ref_layers = {x.name: x for x in reference.layers}
    layers = {x.name: x for x in suspect.layers}
    fits: list[MapFit] = []
    for a, b in pairs:
        ra = matched.get(a)
        # The second layer is the one the reference's first feeds: the graph says so, where the pairing by
        # position and channel counts may take another 1x1 convolution (a projection shortcut).
        rb = second_of.get(ra) if ra is not None else None
        if ra is None or rb is None or (ra, rb) not in reference_pairs:
            continue  # the reference has no such pair here: nothing to align against (a chain is fused instead)
        la, lb, rla, rlb = layers[a], layers[b], ref_layers[ra], ref_layers[rb]
        if la.weight.shape != rla.weight.shape or lb.weight.shape != rlb.weight.shape:  # type: ignore[union-attr]
            why = "shapes differ from the reference's: channels added or cut, not a change of basis"
            fits.append(MapFit(a, b, ra, rb, "none", float("nan"), 1.0, 1.0, note=why))
            continue
        x, bias = _matrices(la)
        z, _ = _matrices(lb)
        y, _ = _matrices(rla)
        v, _ = _matrices(rlb)
        estimate = estimate_map(x, y, z, v)
        if estimate is None:
            why = (f"neither layer fixes the map (the first's rows are shorter than its width, and {a} is wider than"
                   f" {MAX_JOINT_WIDTH} channels or the second layer narrower)")  # fmt: skip
            fits.append(MapFit(a, b, ra, rb, "none", float("nan"), 1.0, 1.0, note=why + ": left alone"))
            continue
        m, method, r1, r2 = estimate
        condition = float(torch.linalg.cond(m))
        fit = MapFit(a, b, ra, rb, method, condition, r1, r2)
        fits.append(fit)
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
            fit.acted = True
            fit.note = f"removed ({method}, condition number {condition:.3g}, residual {fit.residual:.3g})"
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
