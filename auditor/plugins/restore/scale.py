"""Undo per-channel scaling and sign flips, once every channel is in the reference's place.

Two freedoms leave a ReLU network's function unchanged, per channel of a space:

* before a batch-norm (the "pre-norm" stage): the producer's row times ``a``
  (any sign), the batch-norm's running mean times ``a``, its variance such
  that ``var + eps`` is times ``a**2``, its gamma times ``sign(a)`` (the
  "negation through batch-norm" attack is ``a = -1``);
* at the space's output: everything producing the channel (the batch-norm's
  gamma and beta, or the producer's row and bias where no batch-norm
  follows) times ``c > 0``, every reader's input column divided by ``c``.

``a`` is the least-squares factor of the producer's row against the
reference's; ``c`` combines the producer side (``p``) and the readers'
column factors (see :mod:`.factors`). Both are divided out, exactly and
function-preservingly. A layer whose factors all lie within :data:`DEADBAND`
of 1 is left alone (fine-tuning noise, not an edit); otherwise every channel
of it is rescaled. This must run after the channel order is restored (the
authors' README scaled first, which compares each channel with the wrong
one), so a space whose channels are not in the reference's order is skipped
and logged. So is a space with a layer whose tensors disagree about its
output channels (a bias that is not one value per weight row): that layer's
weight is stored in a layout this module does not read, such as
transformers' ``Conv1D`` (GPT-2), which stores ``(in, out)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from auditor.graph import Layer, LayerGraph, LayerKind
from auditor.plugins.restore import factors
from auditor.plugins.restore.plan import Plan, creates_cycle
from auditor.toolkit.channels import DEFAULT_EPS, Space, Tensors, input_params, tensors_of

__all__ = ["DEADBAND", "restore_scales"]

#: |log factor| below which a channel is left as it is.
DEADBAND = 0.01
#: Passes over all spaces at most (see :func:`restore_scales`).
SCALE_PASSES = 3
#: Kinds whose weight rows are their output channels, one bias each.
_ROW_KINDS = (LayerKind.LINEAR, LayerKind.CONV1D, LayerKind.CONV2D)


class _Weights:
    """Copies of the suspect's and the reference's tensors, read on first use."""

    def __init__(self, suspect: LayerGraph, reference: LayerGraph) -> None:
        self.suspect, self.reference = suspect, reference
        self.read: Tensors = {}
        self.touched: set[str] = set()
        self._ref: Tensors = {}

    def s(self, name: str, *, change: bool = False) -> dict[str, torch.Tensor]:
        if name not in self.read:
            self.read.update(tensors_of(self.suspect, [name]))
        if change:
            self.touched.add(name)
        return self.read[name]

    def r(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._ref:
            self._ref.update(tensors_of(self.reference, [name]))
        return self._ref[name]


def _pre_norm(w: _Weights, plan: Plan, space: Space, deadband: float) -> list[dict[str, Any]]:
    """Level 1: a producer's rows against the reference's, absorbed by the batch-norm after it."""
    out = []
    for name in space.producers:
        bn = next((e.dst for e in plan.edges if e.src == name and e.dst in space.passthrough), None)
        ref = plan.alignment.reference_of(name)
        if bn is None or ref is None or "running_var" not in w.suspect.layer(bn).params:
            continue
        a = factors.least_squares_factors(w.s(name)["weight"], w.r(ref)["weight"]).to(torch.float32)
        # The fold restorer measured its factors before the inputs' scale was restored: what is
        # left of them is its estimation error, not fine-tuning noise, so no dead band here.
        unfolded = w.suspect.layer(bn).attrs.get("restored") == "unfolded"
        apply = factors.significant(a, 0.0 if unfolded else deadband)
        if not apply.any():
            continue
        p, norm = w.s(name, change=True), w.s(bn, change=True)
        a = torch.where(apply, a, torch.ones_like(a))
        eps = float(w.suspect.layer(bn).attrs.get("eps", DEFAULT_EPS))
        p["weight"] = p["weight"] / a.reshape(factors.channel_shape(p["weight"]))
        if "bias" in p:
            p["bias"] = p["bias"] / a
        norm["running_mean"] = norm["running_mean"] / a
        norm["running_var"] = ((norm["running_var"] + eps) / a**2 - eps).clamp_min(0.0)
        norm["weight"] = norm["weight"] * a.sign()
        out.append(factors.log_entry(name, "before batch-norm", a, apply))
    return out


def _output_side(w: _Weights, plan: Plan, space: Space) -> tuple[list[tuple[str, list[str]]], torch.Tensor | None]:
    """Producer-side tensors of the space (layer, roles), and the least-squares factor ``p`` over them."""
    parts: list[tuple[str, list[str]]] = []
    s_vals: list[torch.Tensor] = []
    r_vals: list[torch.Tensor] = []
    for name in space.producers:
        bn = next((e.dst for e in plan.edges if e.src == name and e.dst in space.passthrough), None)
        layer = bn if bn is not None else name
        roles: list[str] = ["weight", "bias"] if bn is not None else [r for r in ("weight", "bias") if r in w.s(name)]
        parts.append((layer, roles))
        ref = plan.alignment.reference_of(layer)
        if ref is None or any(r not in w.r(ref) for r in roles):
            continue
        for r in roles:
            sv, rv = w.s(layer)[r], w.r(ref)[r]
            if bn is not None and r == "weight":
                # |gamma|: its sign belongs to the pre-norm stage (a channel negated through the
                # batch-norm), which may not have run yet; the output factor is positive.
                sv, rv = sv.abs(), rv.abs()
            s_vals.append(sv.reshape(space.width, -1))
            r_vals.append(rv.reshape(space.width, -1))
    p = factors.least_squares_factors(torch.cat(s_vals, 1), torch.cat(r_vals, 1)) if s_vals else None
    return parts, p


def _readers(w: _Weights, plan: Plan, space: Space) -> torch.Tensor | None:
    """The readers' column factor ``d_j`` per channel (about ``1 / c_j``), combined over readers."""
    logs, weights, signs = [], [], []
    for c in space.consumers:
        ref = plan.alignment.reference_of(c.layer)
        if ref is None:
            continue
        cols = slice(c.offset, c.offset + space.width * c.block)
        for role in input_params(w.suspect.layer(c.layer)):
            s, r = w.s(c.layer)[role], w.r(ref).get(role)
            if r is None or s.shape != r.shape:
                return None
            s3 = s[:, cols].reshape(s.shape[0], space.width, -1)
            r3 = r[:, cols].reshape(r.shape[0], space.width, -1)
            d = factors.column_factors(s3, r3)
            logs.append(d.abs().log())
            signs.append(d.sign())
            weights.append((r3.to(torch.float64) ** 2).sum((0, 2)))
    if not logs:
        return None
    # Each reader's factors are known up to its own overall gauge: bring them to the first one's
    # before averaging, or channel-dependent weights would mix the gauges unevenly.
    for k in range(1, len(logs)):
        both = torch.isfinite(logs[k]) & torch.isfinite(logs[0])
        if both.any():
            logs[k] = logs[k] - (logs[k][both] - logs[0][both]).median()
    weights = [wt * torch.isfinite(lg) for wt, lg in zip(weights, logs, strict=True)]
    wsum = torch.stack(weights).sum(0).clamp_min(1e-300)
    log_d = (torch.stack(logs).nan_to_num(0.0) * torch.stack(weights)).sum(0) / wsum
    return torch.where(torch.stack(logs).isnan().all(0), float("nan"), signs[0] * log_d.exp())


def _output(w: _Weights, plan: Plan, space: Space, deadband: float) -> list[dict[str, Any]]:
    """Level 2: the space's output scale, divided out of its producers and multiplied into its readers."""
    extra = [n for n in space.passthrough if not any(e.src in space.producers and e.dst == n for e in plan.edges)]
    if extra:
        return []
    parts, p = _output_side(w, plan, space)
    if any(w.suspect.layer(layer).attrs.get("restored") == "unfolded" for layer, _ in parts) and space.consumers:
        # An unfolded batch-norm's gamma carries the fold restorer's estimate, made before the inputs'
        # scale was restored: the readers alone say the factor (up to one factor for the whole space,
        # which the readers' pre-norm stage then takes out of their rows).
        p = None
    # No known reader (two bare state dicts: the other branch of a residual add was chosen as the
    # reader's input, and compensated there): the producer side alone says the factor.
    c = factors.combine(p, _readers(w, plan, space) if space.consumers else None, space.width)
    apply = factors.significant(c, deadband)
    if not apply.any():
        return []
    c = torch.where(apply, c, torch.ones_like(c))
    for layer, roles in parts:
        t = w.s(layer, change=True)
        for role in roles:
            t[role] = t[role] / c.reshape(factors.channel_shape(t[role]))
    for cons in space.consumers:
        t = w.s(cons.layer, change=True)
        for role in input_params(w.suspect.layer(cons.layer)):
            scale = torch.ones(t[role].shape[1])
            scale[cons.offset : cons.offset + space.width * cons.block] = c.repeat_interleave(cons.block)
            t[role] = t[role] * scale.reshape((1, -1) + (1,) * (t[role].ndim - 2))
    return [factors.log_entry(layer, "output", c, apply) for layer, _ in parts]


def _misread(layer: Layer) -> str | None:
    """Why ``layer``'s rows are not its output channels, or None: a linear or convolution layer whose bias
    is not one value per weight row (``(in, out)`` where the bias has one per column)."""
    weight, bias = layer.params.get("weight"), layer.params.get("bias")
    if layer.kind not in _ROW_KINDS or weight is None or bias is None or len(weight.shape) < 2 or len(bias.shape) != 1:
        return None
    rows, n = int(weight.shape[0]), int(bias.shape[0])
    if n == rows:
        return None
    stored = ", stored (in, out)" if n == int(weight.shape[1]) else ""
    return f"{layer.name}: weight {tuple(weight.shape)} with {n} biases{stored}"


def _unread(w: _Weights, plan: Plan) -> dict[str, str]:
    """The suspect's and the reference's layers in a layout this module does not read, by suspect name."""
    out = {}
    for layer in w.suspect.layers:
        ref = plan.alignment.reference_of(layer.name)
        why = _misread(layer) or (_misread(w.reference.layer(ref)) if ref is not None else None)
        if why is not None:
            out[layer.name] = why
    return out


def _layers_of(space: Space) -> list[str]:
    return [*space.producers, *space.passthrough, *(c.layer for c in space.consumers)]


def _fits(space: Space, layer: str, w: _Weights) -> int | None:
    """The block size at which ``space`` can be all of ``layer``'s input, or None."""
    roles = input_params(w.suspect.layer(layer))
    if not roles or not space.width:
        return None
    width = w.suspect.layer(layer).params[roles[0]].shape[1]
    if width % space.width or (width != space.width and w.suspect.layer(layer).kind.value != "linear"):
        return None
    return width // space.width


def _rechoose_readers(w: _Weights, plan: Plan, unread: dict[str, str]) -> None:
    """Without a real graph, which space a layer reads was chosen by channel order, which cannot
    tell spaces apart once every one is in the reference's order. Their scale can: the right
    space's producer-side factors ``p`` and the reader's column factors ``d`` multiply to one
    constant. Where some space shows that far better than the chosen one, it becomes the input."""
    free = [sp for sp in plan.spaces if not sp.frozen and sp.producers and not set(_layers_of(sp)) & set(unread)]
    p_of = {sp.id: _output_side(w, plan, sp)[1] for sp in free}
    readers = {c.layer for sp in plan.spaces for c in sp.consumers}
    for layer in sorted(readers):
        ref = plan.alignment.reference_of(layer)
        current = [(sp, c) for sp in plan.spaces for c in sp.consumers if c.layer == layer]
        if ref is None or len(current) != 1 or layer in unread:
            continue
        s, r = w.s(layer)["weight"], w.r(ref).get("weight")
        if r is None or s.shape != r.shape:
            continue
        spread: dict[int, float] = {}
        for sp in free:
            block, p = _fits(sp, layer, w), p_of[sp.id]
            if block is None or p is None or layer in sp.producers:
                continue
            d = factors.column_factors(s.reshape(s.shape[0], sp.width, -1), r.reshape(r.shape[0], sp.width, -1))
            x = p.abs().log() + d.abs().log()
            x = x[torch.isfinite(x)]
            if x.numel() > 1:
                spread[sp.id] = float(x.std())
        chosen = current[0][0].id
        if not spread:
            continue
        low = min(spread.values())
        reads: dict[str, set[int]] = {c.layer: set() for sp in plan.spaces for c in sp.consumers}
        for sp in plan.spaces:
            for c in sp.consumers:
                if c.layer != layer:
                    reads[c.layer].add(sp.id)
        producers = {sp.id: sp.producers for sp in plan.spaces}
        # Equally consistent spaces (two branches of one residual add) are the same channels: keep the
        # choice unless it closes a loop, which would leave no order to restore scales in.
        fine = sorted((k for k, v in spread.items() if v <= low + 0.01), key=lambda k: spread[k])
        open_ = [k for k in fine if not creates_cycle(reads, producers, layer, k)]
        best = chosen if chosen in open_ else (open_ or fine)[0]
        if best != chosen and low < 0.05:
            old_space, consumer = current[0]
            old_space.consumers.remove(consumer)
            new_space = next(sp for sp in free if sp.id == best)
            new_space.consumers.append(dataclasses.replace(consumer, block=_fits(new_space, layer, w) or 1))


def _input_side_first(plan: Plan, reference: LayerGraph) -> list[Space]:
    """The spaces in an order where every space comes after the spaces its producers read
    (reference position breaks ties, and decides if the readers ever form a cycle)."""
    r_pos = {layer.name: i for i, layer in enumerate(reference.layers)}

    def position(space: Space) -> int:
        return min((r_pos.get(plan.alignment.pairs.get(p, ""), len(r_pos)) for p in space.producers), default=0)

    waiting = {sp.id: {src.id for src in plan.spaces for c in src.consumers if c.layer in sp.producers}
               for sp in plan.spaces}  # fmt: skip
    pending = sorted(plan.spaces, key=position)
    ordered: list[Space] = []
    while pending:
        ready = next((sp for sp in pending if not waiting[sp.id] - {s.id for s in ordered}), pending[0])
        ordered.append(ready)
        pending.remove(ready)
    return ordered


def restore_scales(
    suspect: LayerGraph, reference: LayerGraph, plan: Plan, *, deadband: float = DEADBAND
) -> tuple[Tensors, list[dict[str, Any]], list[str]]:
    """Changed tensors, one log entry per rescaled layer and stage, and notes on skipped spaces.

    The output stage runs first, for every space from the input side: behind a batch-norm it
    reads |gamma| and beta, which the pre-norm stage does not change in size, and the readers'
    column factors are solved with their own row factors, so it needs nothing restored first.
    Then the pre-norm stage, each producer's inputs now restored. Where no batch-norm breaks a
    residual loop (the block's input space is also its output space, and a producer's rows are
    all it has), the first pass estimates with inputs not yet restored; passes repeat until
    nothing is left to correct."""
    w = _Weights(suspect, reference)
    entries: list[dict[str, Any]] = []
    notes: list[str] = []
    unread = _unread(w, plan)
    notes += [f"{why}: its rows are not its output channels, a layout not read here" for why in unread.values()]
    if plan.readers_from_data:  # on a copy of the spaces: the plan is shared (see plugin.shared_plan)
        spaces = [dataclasses.replace(sp, consumers=list(sp.consumers)) for sp in plan.spaces]
        plan = dataclasses.replace(plan, spaces=spaces)
        _rechoose_readers(w, plan, unread)
    order = []
    for space in _input_side_first(plan, reference):
        index = plan.maps.get(space.id)
        misread = sorted({n for n in _layers_of(space) if n in unread})
        if misread:
            notes.append(f"{', '.join(space.producers)}: scale left alone (it meets {', '.join(misread)})")
        elif index is not None and not torch.equal(index, torch.arange(space.width)):
            notes.append(f"{', '.join(space.producers)}: channels not in the reference's order; scale left alone")
        elif all(plan.alignment.reference_of(p) for p in space.producers):
            order.append(space)
    for _ in range(SCALE_PASSES):
        found: list[dict[str, Any]] = []
        for space in order:
            if not space.frozen:
                found += _output(w, plan, space, deadband)
        for space in order:
            found += _pre_norm(w, plan, space, deadband)
        entries += found
        if not found:
            break
    return {k: w.read[k] for k in sorted(w.touched)}, factors.merge_entries(entries), notes
