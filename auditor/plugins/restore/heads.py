"""Transformers brought back to the reference's form (``restore-transformer``): rotary row order, attention
heads and MLP units, per-head scales, the residual stream's rotation, folded norm weights.

The edits are :mod:`auditor.toolkit.transformers`' (the ones ``auditor attack`` applies). Every step
compares the suspect with the reference in a form those edits cannot change: a vector of the residual
stream (a reader's row, norm weight folded in; a writer's column) is seen through the embedding and the
LM head, ``P v`` with ``P = [E; L diag(g_final)]``. A rotation ``R`` of the stream leaves ``P v``
unchanged (``E R R^T v``), so heads and units can be matched before the rotation is known:

1. **rotary row order**: the head matching below is scored with Q/K rows as stored and with llama.cpp's
   reordering undone; the better reading is kept when it wins by a clear margin;
2. **heads** as blocks: key/value groups by Hungarian assignment on the summed |cosine| of their K and V
   blocks plus the best assignment of their query heads (Q rows, O columns), then query heads within the
   matched groups;
3. **MLP units** by assignment on gate rows, up rows and down columns together;
4. **scales**: one least-squares factor per Q, K, V head, O column block and up/down unit, divided out;
5. **rotation** (RMSNorm decoders): orthogonal Procrustes of the suspect's embedding, LM head, readers and
   writers onto the reference's (norm weights folded on both sides); undone when it is not the identity
   and fits (relative residual below :data:`MAX_ROTATION_RESIDUAL`);
6. **norms**: a norm whose weights are all 1 where the reference's are not gets its weights back, each
   the least-squares factor between its readers' columns and the reference's; the readers are divided.

The rewrite stands only if the guard finds the result derived from the reference
(:class:`~.structural.StructuralRestorer`); each step's figures are in the log.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from auditor.graph import LayerGraph
from auditor.plugins.restore.structural import StructuralRestorer

if TYPE_CHECKING:
    import torch

    from auditor.toolkit.transformers import Block, Layout, State

__all__ = ["HEAD_SIZES", "MAX_ROTATION_RESIDUAL", "TransformerRestorer", "align_transformer", "guess_layout"]

#: A rotation is undone only when it maps the reference onto the suspect this well (an independent model's fit
#: stays near 1; a rotated copy's is float rounding).
MAX_ROTATION_RESIDUAL = 0.5
#: Undoing the rotary reordering must raise the mean matched head similarity by this much.
ROPE_MARGIN = 0.05
#: Scale factors closer to 1 than this are left (float rounding, not an edit).
SCALE_TOLERANCE = 1e-4
#: A factor is divided out only where the block's features agree with the reference's at least this well
#: (|cosine|): an unrelated block's least-squares factor is noise.
MIN_SCALE_COSINE = 0.5
#: Features use at most this many embedding and LM-head rows each (evenly spaced).
MAX_FEATURE_ROWS = 2048


def _w(state: State, name: str) -> torch.Tensor:
    return state[f"{name}.weight"].double()


class _Frame:
    """The residual-stream features of one model: ``P v`` and the norm weights folded into the readers."""

    def __init__(self, state: State, layout: Layout) -> None:
        import torch

        self.state, self.layout = state, layout
        parts = []
        if layout.embed is not None:
            e = _w(state, layout.embed)
            idx = torch.linspace(0, e.shape[0] - 1, min(e.shape[0], MAX_FEATURE_ROWS)).round().long()
            parts.append(e[idx])
            if layout.lm_head is not None:
                parts.append(self.reader(layout.lm_head, layout.final_norm)[idx])
        self.p = torch.cat(parts) if parts else None

    def norm(self, name: str | None) -> torch.Tensor | None:
        if name is None or f"{name}.weight" not in self.state:
            return None
        return self.state[f"{name}.weight"].double()

    def reader(self, name: str, norm: str | None) -> torch.Tensor:
        """The reader's weight with its norm's weight folded in."""
        g = self.norm(norm)
        w = _w(self.state, name)
        return w if g is None else w * g[None, :]

    def features(self, vectors: torch.Tensor) -> torch.Tensor:
        """``P v`` for each row ``v`` of ``vectors`` (rows themselves when there is no embedding)."""
        return vectors if self.p is None else vectors @ self.p.T


def _blocks(f: torch.Tensor, size: int) -> torch.Tensor:
    """Feature rows grouped into blocks of ``size`` rows, flattened and normalised."""
    import torch

    b = f.reshape(f.shape[0] // size, -1)
    return b / torch.linalg.vector_norm(b, dim=1, keepdim=True).clamp_min(1e-30)


def _assign(sim: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Hungarian assignment maximising ``sim`` (reference rows x suspect columns): suspect index per
    reference slot, and the mean matched similarity."""
    import torch
    from scipy.optimize import linear_sum_assignment

    sim = torch.nan_to_num(sim, nan=0.0, posinf=0.0, neginf=0.0)  # a hostile file's NaN matches nothing
    rows, cols = linear_sum_assignment(-sim.numpy())
    index = torch.as_tensor(cols[rows.argsort()], dtype=torch.long)
    return index, float(sim[torch.arange(len(index)), index].mean())


def _head_features(frame: _Frame, block: Block) -> dict[str, torch.Tensor]:
    d = frame.layout.head_dim
    return {
        "q": _blocks(frame.features(frame.reader(block.q, block.attn_norm)), d),
        "k": _blocks(frame.features(frame.reader(block.k, block.attn_norm)), d),
        "v": _blocks(frame.features(frame.reader(block.v, block.attn_norm)), d),
        "o": _blocks(frame.features(_w(frame.state, block.o).T), d),
    }


def _match_heads(s: _Frame, r: _Frame, block: Block) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Key/value groups, then query heads within them: suspect index per reference slot, and the mean
    matched similarity (of Q with O, K with V, in [0, 1])."""
    import torch

    fs, fr = _head_features(s, block), _head_features(r, block)
    sim_q = ((fr["q"] @ fs["q"].T).abs() + (fr["o"] @ fs["o"].T).abs()) / 2
    sim_kv = ((fr["k"] @ fs["k"].T).abs() + (fr["v"] @ fs["v"].T).abs()) / 2
    g = s.layout.group
    n = s.layout.kv_heads
    groups = torch.zeros(n, n, dtype=torch.float64)
    for a in range(n):  # reference group a, suspect group b
        for b in range(n):
            _, inner = _assign(sim_q[a * g : (a + 1) * g, b * g : (b + 1) * g])
            groups[a, b] = (sim_kv[a, b] + inner) / 2
    group_index, score = _assign(groups)
    q_index = []
    for a, b in enumerate(group_index.tolist()):
        inner_index, _ = _assign(sim_q[a * g : (a + 1) * g, b * g : (b + 1) * g])
        q_index.append(b * g + inner_index)
    return group_index, torch.cat(q_index), score


def _match_units(s: _Frame, r: _Frame, block: Block) -> tuple[torch.Tensor, float]:
    import torch

    def parts(frame: _Frame) -> list[torch.Tensor]:
        names = [x for x in (block.gate, block.up) if x is not None]
        rows = [frame.features(frame.reader(x, block.mlp_norm)) for x in names]
        rows.append(frame.features(_w(frame.state, block.down).T))
        return [_blocks(x, 1) for x in rows]

    sim = sum((a @ b.T).abs() for a, b in zip(parts(r), parts(s), strict=True))
    assert isinstance(sim, torch.Tensor)
    return _assign(sim / (3 if block.gate is not None else 2))


def _factor(fs: torch.Tensor, fr: torch.Tensor) -> torch.Tensor:
    """Least-squares factor per row block: ``fs ~ c fr``."""
    return (fs * fr).sum(dim=1) / (fr * fr).sum(dim=1).clamp_min(1e-30)


def _unscale(state: State, s: _Frame, r: _Frame, block: Block, layout: Layout) -> int:
    """Divide out one factor per Q/K/V head, O column block and up/down unit; how many were not 1."""
    import torch

    d, scaled = layout.head_dim, 0
    jobs = [(block.q, block.attn_norm, d, False), (block.k, block.attn_norm, d, False),
            (block.v, block.attn_norm, d, False), (block.o, None, d, True), (block.up, block.mlp_norm, 1, False),
            (block.down, None, 1, True)]  # fmt: skip
    for name, norm, size, columns in jobs:

        def feats(frame: _Frame, name: str = name, norm: str | None = norm, columns: bool = columns) -> torch.Tensor:
            v = _w(frame.state, name).T if columns else frame.reader(name, norm)
            return frame.features(v)

        fs, fr = feats(s), feats(r)
        bs, br = fs.reshape(fs.shape[0] // size, -1), fr.reshape(fr.shape[0] // size, -1)
        c = _factor(bs, br)
        cosine = (_blocks(bs, 1) * _blocks(br, 1)).sum(dim=1).abs()
        c = torch.where(((c - 1).abs() > SCALE_TOLERANCE) & (cosine >= MIN_SCALE_COSINE), c, torch.ones_like(c))
        if not torch.equal(c, torch.ones_like(c)):
            scaled += int(((c - 1).abs() > SCALE_TOLERANCE).sum())
            per = c.repeat_interleave(size)
            w = state[f"{name}.weight"].double()
            state[f"{name}.weight"] = (w / per[None, :] if columns else w / per[:, None]).float()
            if not columns and f"{name}.bias" in state:
                state[f"{name}.bias"] = (state[f"{name}.bias"].double() / per).float()
    return scaled


def _rotation_rows(frame: _Frame, layout: Layout) -> Iterator[torch.Tensor]:
    """The rows Procrustes pairs, one matrix at a time: embedding, readers (norms folded), writers' columns."""
    from auditor.toolkit.transformers import readers, writers

    assert layout.embed is not None
    yield _w(frame.state, layout.embed)
    for norm, names in readers(layout):
        for name in names:
            yield frame.reader(name, norm)
    for name in writers(layout):
        yield _w(frame.state, name).T


def _unrotate(state: State, s: State, r: State, layout: Layout) -> dict[str, Any]:
    """Procrustes over the embedding, the readers (norms folded) and the writers; undo it when it fits.

    Only ``M = X_r^T X_s`` (hidden x hidden) and the squared norms are accumulated, one matrix at a time,
    so the stacked rows of a large model are never held at once."""
    import torch

    from auditor.toolkit.transformers import readers, writers

    m, ss, rr = None, 0.0, 0.0
    for xs, xr in zip(_rotation_rows(_Frame(s, layout), layout), _rotation_rows(_Frame(r, layout), layout),
                      strict=True):  # fmt: skip
        m = xr.T @ xs if m is None else m + xr.T @ xs
        ss, rr = ss + float((xs * xs).sum()), rr + float((xr * xr).sum())
    assert m is not None
    if not bool(torch.isfinite(m).all()):
        return {"step": "rotation", "acted": False, "note": "non-finite weights: no rotation estimated"}
    u, _, vt = torch.linalg.svd(m)
    rot = u @ vt
    before = max(ss + rr - 2 * float(torch.trace(m)), 0.0) ** 0.5 / rr**0.5
    after = max(ss + rr - 2 * float(torch.trace(rot @ m.T)), 0.0) ** 0.5 / rr**0.5
    distance = float(torch.linalg.norm(rot - torch.eye(len(rot), dtype=rot.dtype)) / len(rot) ** 0.5)
    row: dict[str, Any] = {"step": "rotation", "residual_before": round(before, 6), "residual_after": round(after, 6),
                           "distance_from_identity": round(distance, 6), "acted": False}  # fmt: skip
    if distance < 1e-3:
        row["note"] = "the residual stream is not rotated"
        return row
    if after > MAX_ROTATION_RESIDUAL:
        row["note"] = f"no rotation maps the reference onto the suspect (residual {after:.3g}): left alone"
        return row
    frame = _Frame(s, layout)
    for norm, names in readers(layout):
        for name in names:
            state[f"{name}.weight"] = (frame.reader(name, norm) @ rot.T).float()
        if norm is not None and f"{norm}.weight" in state:
            state[f"{norm}.weight"] = torch.ones_like(state[f"{norm}.weight"])
    assert layout.embed is not None
    state[f"{layout.embed}.weight"] = (_w(s, layout.embed) @ rot.T).float()
    for name in writers(layout):
        state[f"{name}.weight"] = (rot @ _w(s, name)).float()
        if f"{name}.bias" in state:
            state[f"{name}.bias"] = (state[f"{name}.bias"].double() @ rot.T).float()
    row.update(acted=True, note=f"rotation undone (relative residual {before:.3g} -> {after:.3g})")
    return row


def _unfold(state: State, r: State, layout: Layout) -> list[dict[str, Any]]:
    """Give every norm folded into its readers (weights all 1, the reference's not) its weights back."""
    import torch

    from auditor.toolkit.transformers import readers

    rows = []
    for norm, names in readers(layout):
        key = f"{norm}.weight"
        if norm is None or key not in state or not names:
            continue
        ones = torch.ones_like(state[key])
        if not torch.allclose(state[key], ones, atol=1e-6) or torch.allclose(r[key], ones, atol=1e-6):
            continue
        a_s = torch.cat([_w(state, x) for x in names])
        a_r = torch.cat([_w(r, x) for x in names])
        g = _factor(a_s.T, a_r.T)
        residual = float(torch.linalg.norm(a_s / g[None, :] - a_r) / torch.linalg.norm(a_r))
        # A norm weight may be negative (trained RMSNorm weights sometimes are), never zero: it is divided by.
        if not bool(torch.isfinite(g).all()) or bool((g.abs() < 1e-12).any()) or residual > MAX_ROTATION_RESIDUAL:
            note = "its readers do not fit the reference's columns times one factor each: left"
            rows.append({"step": "unfold", "norm": norm, "acted": False, "residual": round(residual, 6), "note": note})
            continue
        for x in names:
            state[f"{x}.weight"] = (_w(state, x) / g[None, :]).float()
        state[key] = g.float()
        rows.append({"step": "unfold", "norm": norm, "readers": names, "residual": round(residual, 6), "acted": True})
    return rows


def _heads_score(s: State, r: State, layout: Layout) -> float:
    fs, fr = _Frame(s, layout), _Frame(r, layout)
    scores = [_match_heads(fs, fr, b)[2] for b in layout.blocks]
    return sum(scores) / len(scores)


def align_transformer(s: State, r: State, layout: Layout) -> tuple[State, list[dict[str, Any]], bool]:
    """The suspect state brought into the reference's form, one log row per step, and whether anything
    changed (see the module docstring)."""
    import torch

    from auditor.toolkit.transformers import apply_head_order, apply_unit_order, rope_unreorder

    state = {k: v.clone() for k, v in s.items()}
    rows: list[dict[str, Any]] = []
    changed = False
    if layout.rotary and layout.head_dim % 2 == 0:
        unreordered = rope_unreorder(state, layout)
        as_is, undone = _heads_score(state, r, layout), _heads_score(unreordered, r, layout)
        acted = undone > as_is + ROPE_MARGIN
        rows.append({"step": "rope-order", "score_as_stored": round(as_is, 6), "score_reordering_undone":
                     round(undone, 6), "acted": acted})  # fmt: skip
        if acted:
            state, changed = unreordered, True
    for i, block in enumerate(layout.blocks):
        fs, fr = _Frame(state, layout), _Frame(r, layout)
        groups, q_heads, head_score = _match_heads(fs, fr, block)
        units, unit_score = _match_units(fs, fr, block)
        moved_heads = int((q_heads != torch.arange(len(q_heads))).sum())
        moved_units = int((units != torch.arange(len(units))).sum())
        if moved_heads:
            apply_head_order(state, layout, block, groups, q_heads)
        if moved_units:
            apply_unit_order(state, block, units)
        scaled = _unscale(state, _Frame(state, layout), fr, block, layout)
        changed = changed or bool(moved_heads or moved_units or scaled)
        rows.append({"step": "block", "block": i, "heads_moved": moved_heads, "query_head_order": q_heads.tolist(),
                     "head_similarity": round(head_score, 6), "units_moved": moved_units,
                     "unit_similarity": round(unit_score, 6), "factors_divided": scaled})  # fmt: skip
    if layout.rms and layout.embed is not None and layout.lm_head is not None:
        row = _unrotate(state, dict(state), r, layout)
        rows.append(row)
        changed = changed or row["acted"]
    unfolded = _unfold(state, r, layout)
    rows += unfolded
    changed = changed or any(x["acted"] for x in unfolded)
    return state, rows, changed


_NOT_OURS = "not a transformer this restorer reads (Llama-style or GPT-2 decoder, BERT or ViT encoder)"

#: Head sizes tried when no config.json says (largest first).
HEAD_SIZES = (256, 128, 96, 80, 64, 48, 32, 16, 8)


def guess_layout(s: State, r: State) -> Layout | None:
    """Without a config.json: the largest head size whose head matching (rotary order as stored or undone)
    scores within 0.005 of the best size's. Larger blocks than the real heads match only where no head moved,
    smaller ones split rotary pairs and groups."""
    from auditor.toolkit.transformers import layout_of, rope_unreorder, split_conv1d

    first = layout_of(r, None, head_dim=1)  # only where the blocks are
    if first is None:
        return None
    s, r_split = split_conv1d(s), split_conv1d(r)
    q_rows = r_split[f"{first.blocks[0].q}.weight"].shape[0]
    k_rows = r_split[f"{first.blocks[0].k}.weight"].shape[0]
    scored = []
    for d in HEAD_SIZES:
        if q_rows % d or k_rows % d or (q_rows // d) % (k_rows // d):
            continue
        layout = layout_of(r, None, head_dim=d)
        assert layout is not None
        score = _heads_score(s, r_split, layout)
        if layout.rotary and d % 2 == 0:
            score = max(score, _heads_score(rope_unreorder(s, layout), r_split, layout))
        scored.append((score, d, layout))
    if not scored:
        return first
    best = max(x[0] for x in scored)
    return next(layout for score, _, layout in scored if score >= best - 0.005)


def _flat(graph: LayerGraph) -> dict[str, torch.Tensor]:
    from auditor.toolkit.channels import tensors_of

    return {f"{layer}.{role}": t for layer, params in tensors_of(graph).items() for role, t in params.items()}


class TransformerRestorer(StructuralRestorer):
    """Undoes the function-preserving edits of a transformer against the reference (see :mod:`.heads`)."""

    id = "restore-transformer"
    order = 8
    rows_key: ClassVar[str] = "steps"
    description = ("Put a transformer's rotary row order, heads, MLP units, head scales, residual rotation "
                   "and norm weights back in the reference's form.")  # fmt: skip

    def rewrite(
        self, suspect: LayerGraph, reference: LayerGraph
    ) -> tuple[LayerGraph | None, list[dict[str, Any]], list[dict[str, Any]], str]:
        """The aligned suspect (None: not a transformer, or already in the reference's form), the steps,
        one layer row per changed matrix, and why."""
        import torch

        from auditor.errors import UsageError
        from auditor.toolkit.channels import graph_with_tensors
        from auditor.toolkit.transformers import layout_of, merge_conv1d, read_config, split_conv1d

        refs = {f"{layer.name}.{role}": ref for layer in reference.layers for role, ref in layer.params.items()}
        if layout_of(refs, None, head_dim=1) is None:  # names and shapes only: nothing is read for other models
            return None, [], [], _NOT_OURS
        s, r = _flat(suspect), _flat(reference)
        config = read_config(reference.path) or read_config(suspect.path)
        if any(k not in s or s[k].shape != v.shape for k, v in r.items()) or len(s) != len(r):
            return None, [], [], "the suspect's transformer layout or shapes differ from the reference's"
        try:
            layout = layout_of(r, config) if config else guess_layout(s, r)
        except UsageError as exc:
            return None, [], [], f"the reference's heads cannot be read: {exc}"
        if layout is None:
            return None, [], [], _NOT_OURS
        guess = "" if config else f" (no config.json: heads of {layout.head_dim} dimensions, the best-matching size)"
        split_state, rows, changed = align_transformer(split_conv1d(s), split_conv1d(r), layout)
        state = merge_conv1d(split_state, layout)
        if not changed:
            notes = "; ".join(f"{x['step']}: {x['note']}" for x in rows if x.get("note") and not x.get("acted"))
            return None, rows, [], "nothing to undo" + guess + (f" ({notes})" if notes else "")
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        layers = []
        for layer in suspect.layers:
            params = {role: state[f"{layer.name}.{role}"] for role in layer.params}
            if any(not torch.equal(params[role], s[f"{layer.name}.{role}"]) for role in params):
                tensors[layer.name] = params
                num = sum(float(torch.linalg.norm(params[x] - r[f"{layer.name}.{x}"])) for x in params)
                den = max(sum(float(torch.linalg.norm(r[f"{layer.name}.{x}"])) for x in params), 1e-30)
                note = f"restored (relative difference from the reference {num / den:.2g})"
                layers.append({"name": layer.name, "reference": layer.name, "note": note})
        steps = [x["step"] for x in rows if x.get("acted") or x.get("heads_moved") or x.get("units_moved")
                 or x.get("factors_divided")]  # fmt: skip
        why = f"transformer aligned with the reference ({', '.join(dict.fromkeys(steps))}){guess}"
        return graph_with_tensors(suspect, tensors, note=f"restore-transformer: {why}"), rows, layers, why
