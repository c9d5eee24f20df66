"""Transformers brought back to the reference's form (``restore-transformer``): rotary row order, attention
heads and MLP units, per-head scales, the residual stream's rotation, folded norm weights.

The edits are :mod:`auditor.toolkit.transformers`' (the ones ``auditor attack`` applies). Every step
compares the suspect with the reference in a form those edits cannot change: a vector of the residual
stream (a reader's row, norm weight folded in; a writer's column) is seen through the embedding and the
LM head, ``P v`` with ``P = [E; L diag(g_final)]``. A rotation ``R`` of the stream leaves ``P v``
unchanged (``E R R^T v``), so heads and units can be matched before the rotation is known. A cheap test
comes first: when the suspect's embedding is the reference's up to float rounding, the stream is not
rotated, and rows are compared as they stand (no ``P``, no Procrustes):

1. **rotary row order**: the head matching below is scored with Q/K rows as stored and with llama.cpp's
   reordering undone; the better reading is kept when it wins by a clear margin;
2. **heads** as blocks: key/value groups by Hungarian assignment on the summed |cosine| of their K and V
   blocks plus the best assignment of their query heads (Q rows, O columns), then query heads within the
   matched groups;
3. **MLP units** by assignment on gate rows, up rows and down columns together, clear pairs first
   (:mod:`.pairs`: the Hungarian method runs only on the ambiguous remainder);
4. **scales**: one least-squares factor per Q, K, V head, O column block and up/down unit, divided out;
5. **rotation** (RMSNorm decoders): orthogonal Procrustes of the suspect's embedding, LM head, readers and
   writers onto the reference's (norm weights folded on both sides); undone when it is not the identity
   and fits (relative residual below :data:`MAX_ROTATION_RESIDUAL`);
6. **norms**: a norm whose weights are all 1 where the reference's are not gets its weights back, each
   the least-squares factor between its readers' columns and the reference's; the readers are divided.

Both models are read block by block from their files and the edits are recorded, not applied
(:class:`~.lazy.LazyState`): the rewritten graph reads each tensor and applies its edits when asked, so a
7-billion-parameter model is never held as float32. The rewrite stands only if the guard finds the result
derived from the reference (:class:`~.structural.StructuralRestorer`; above :data:`PLAN_LIMIT` parameters
the rows are compared where they stand, :func:`in_place_matches`); each step's figures are in the log.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

from auditor.graph import LayerGraph
from auditor.plugins.restore.structural import PLAN_LIMIT, StructuralRestorer

if TYPE_CHECKING:
    import torch

    from auditor.graph import TensorRef
    from auditor.plugins.restore.lazy import LazyState
    from auditor.plugins.restore.pairs import Matching
    from auditor.plugins.restore.plan import LayerMatch
    from auditor.toolkit.transformers import Block, Layout, State

__all__ = ["EMBEDDING_ROUNDING", "HEAD_SIZES", "MAX_ROTATION_RESIDUAL", "PLAN_LIMIT", "TransformerRestorer",
           "align_transformer", "guess_layout", "in_place_matches"]  # fmt: skip

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
#: The residual stream counts as not rotated when the suspect's embedding differs from the reference's by at
#: most this (relative Frobenius norm): bfloat16 storage is 0.2-0.4%, any rotation of the stream about 140%.
EMBEDDING_ROUNDING = 1e-2


class _Frame:
    """The residual-stream features of one model: ``P v`` (``P`` None: the rows themselves) and the norm
    weights folded into the readers, in ``dtype``."""

    def __init__(self, state: Mapping[str, torch.Tensor], layout: Layout, *, basis: bool = True) -> None:
        import torch

        self.state, self.layout = state, layout
        self.dtype = torch.float64 if basis else torch.float32
        parts = []
        if basis and layout.embed is not None:
            e = self.weight(layout.embed)
            idx = torch.linspace(0, e.shape[0] - 1, min(e.shape[0], MAX_FEATURE_ROWS)).round().long()
            parts.append(e[idx])
            if layout.lm_head is not None:
                parts.append(self.reader(layout.lm_head, layout.final_norm)[idx])
        self.p = torch.cat(parts) if parts else None

    def weight(self, name: str) -> torch.Tensor:
        return self.state[f"{name}.weight"].to(self.dtype)

    def norm(self, name: str | None) -> torch.Tensor | None:
        if name is None or f"{name}.weight" not in self.state:
            return None
        return self.state[f"{name}.weight"].to(self.dtype)

    def reader(self, name: str, norm: str | None) -> torch.Tensor:
        """The reader's weight with its norm's weight folded in."""
        g = self.norm(norm)
        w = self.weight(name)
        return w if g is None else w * g[None, :]

    def features(self, vectors: torch.Tensor) -> torch.Tensor:
        """``P v`` for each row ``v`` of ``vectors`` (rows themselves when there is no ``P``)."""
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
        "o": _blocks(frame.features(frame.weight(block.o).T), d),
    }


def _match_heads(s: _Frame, r: _Frame, block: Block) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Key/value groups, then query heads within them: suspect index per reference slot, and the mean
    matched similarity (of Q with O, K with V, in [0, 1])."""
    return _match_head_features(_head_features(s, block), _head_features(r, block), s.layout)


def _match_head_features(fs: dict[str, torch.Tensor], fr: dict[str, torch.Tensor],
                         layout: Layout) -> tuple[torch.Tensor, torch.Tensor, float]:  # fmt: skip
    import torch

    sim_q = ((fr["q"] @ fs["q"].T).abs() + (fr["o"] @ fs["o"].T).abs()) / 2
    sim_kv = ((fr["k"] @ fs["k"].T).abs() + (fr["v"] @ fs["v"].T).abs()) / 2
    g = layout.group
    n = layout.kv_heads
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


def _match_units(s: _Frame, r: _Frame, block: Block) -> Matching:
    """The MLP units' :class:`~.pairs.Matching` (gate, up rows and down columns together)."""
    import torch

    from auditor.plugins.restore.pairs import match

    def parts(frame: _Frame) -> list[torch.Tensor]:
        names = [x for x in (block.gate, block.up) if x is not None]
        rows = [frame.features(frame.reader(x, block.mlp_norm)) for x in names]
        rows.append(frame.features(frame.weight(block.down).T))
        # Fresh contiguous tensors (LazyState never hands out its sources), which the matching normalises in place.
        return [x.to(torch.float32).contiguous() for x in rows]

    return match(parts(r), parts(s), consume=True)


def _factor(fs: torch.Tensor, fr: torch.Tensor) -> torch.Tensor:
    """Least-squares factor per row block: ``fs ~ c fr``."""
    return (fs * fr).sum(dim=1) / (fr * fr).sum(dim=1).clamp_min(1e-30)


def _moments(s: _Frame, r: _Frame, name: str, norm: str | None, columns: bool) -> tuple[torch.Tensor, ...]:
    """Per vector (a reader's row, a writer's column) of ``name``: ``<s, r>``, ``|s|^2``, ``|r|^2`` of the
    features (in the raw basis straight off the weights, without transposing a writer)."""
    import torch

    if s.p is None:
        a = s.weight(name) if columns else s.reader(name, norm)
        b = r.weight(name) if columns else r.reader(name, norm)
        if columns:  # a sum down the columns is faster on the product than as a strided norm
            return (a * b).sum(0), (a * a).sum(0), (b * b).sum(0)
        return torch.einsum("ij,ij->i", a, b), torch.einsum("ij,ij->i", a, a), torch.einsum("ij,ij->i", b, b)
    fs = s.features(s.weight(name).T if columns else s.reader(name, norm))
    fr = r.features(r.weight(name).T if columns else r.reader(name, norm))
    return (fs * fr).sum(1), (fs * fs).sum(1), (fr * fr).sum(1)


def _unscale(state: LazyState, s: _Frame, r: _Frame, block: Block, layout: Layout) -> int:
    """Divide out one factor per Q/K/V head, O column block and up/down unit; how many were not 1.

    Each factor is the least-squares ``c`` of the block's features, ``s ~ c r``, used where the block's
    |cosine| with the reference's is at least :data:`MIN_SCALE_COSINE`."""
    import torch

    d, scaled = layout.head_dim, 0
    jobs = [(block.q, block.attn_norm, d, False), (block.k, block.attn_norm, d, False),
            (block.v, block.attn_norm, d, False), (block.o, None, d, True), (block.up, block.mlp_norm, 1, False),
            (block.down, None, 1, True)]  # fmt: skip
    for name, norm, size, columns in jobs:
        ab, ss, rr = (x.double().reshape(-1, size).sum(1) for x in _moments(s, r, name, norm, columns))
        c = ab / rr.clamp_min(1e-30)
        cosine = ab.abs() / (ss.sqrt().clamp_min(1e-30) * rr.sqrt().clamp_min(1e-30))
        c = torch.where(((c - 1).abs() > SCALE_TOLERANCE) & (cosine >= MIN_SCALE_COSINE), c, torch.ones_like(c))
        if not torch.equal(c, torch.ones_like(c)):
            scaled += int(((c - 1).abs() > SCALE_TOLERANCE).sum())
            per = c.repeat_interleave(size)
            state.edit(f"{name}.weight", "div_cols" if columns else "div_rows", per)
            if not columns and f"{name}.bias" in state:
                state.edit(f"{name}.bias", "div_rows", per)
    return scaled


def _rotation_rows(frame: _Frame, layout: Layout) -> Iterator[torch.Tensor]:
    """The rows Procrustes pairs, one matrix at a time: embedding, readers (norms folded), writers' columns."""
    from auditor.toolkit.transformers import readers, writers

    assert layout.embed is not None
    yield frame.weight(layout.embed)
    for norm, names in readers(layout):
        for name in names:
            yield frame.reader(name, norm)
    for name in writers(layout):
        yield frame.weight(name).T


def _unrotate(state: LazyState, r: LazyState, layout: Layout) -> dict[str, Any]:
    """Procrustes over the embedding, the readers (norms folded) and the writers; undo it when it fits.

    Only ``M = X_r^T X_s`` (hidden x hidden) and the squared norms are accumulated, one matrix at a time,
    so the stacked rows of a large model are never held at once."""
    import torch

    from auditor.toolkit.transformers import readers, writers

    m, ss, rr = None, 0.0, 0.0
    for xs, xr in zip(_rotation_rows(_Frame(state, layout), layout), _rotation_rows(_Frame(r, layout), layout),
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
    for norm, names in readers(layout):
        g = state[f"{norm}.weight"].double() if norm is not None and f"{norm}.weight" in state else None
        for name in names:
            if g is not None:
                state.edit(f"{name}.weight", "mul_cols", g)
            state.edit(f"{name}.weight", "right", rot.T)
        if norm is not None and f"{norm}.weight" in state:
            state.edit(f"{norm}.weight", "set", torch.ones(state.shapes[f"{norm}.weight"]))
    assert layout.embed is not None
    state.edit(f"{layout.embed}.weight", "right", rot.T)
    for name in writers(layout):
        state.edit(f"{name}.weight", "left", rot)
        if f"{name}.bias" in state:
            state.edit(f"{name}.bias", "right", rot.T)
    row.update(acted=True, note=f"rotation undone (relative residual {before:.3g} -> {after:.3g})")
    return row


def _unfold(state: LazyState, r: LazyState, layout: Layout) -> list[dict[str, Any]]:
    """Give every norm folded into its readers (weights all 1, the reference's not) its weights back."""
    import torch

    from auditor.toolkit.transformers import readers

    rows = []
    for norm, names in readers(layout):
        key = f"{norm}.weight"
        if norm is None or key not in state or not names:
            continue
        mine, theirs = state[key], r[key]
        ones = torch.ones_like(mine)
        if not torch.allclose(mine, ones, atol=1e-6) or torch.allclose(theirs, ones, atol=1e-6):
            continue
        a_s = torch.cat([state[f"{x}.weight"].double() for x in names])
        a_r = torch.cat([r[f"{x}.weight"].double() for x in names])
        g = _factor(a_s.T, a_r.T)
        residual = float(torch.linalg.norm(a_s / g[None, :] - a_r) / torch.linalg.norm(a_r))
        del a_s, a_r
        # A norm weight may be negative (trained RMSNorm weights sometimes are), never zero: it is divided by.
        if not bool(torch.isfinite(g).all()) or bool((g.abs() < 1e-12).any()) or residual > MAX_ROTATION_RESIDUAL:
            note = "its readers do not fit the reference's columns times one factor each: left"
            rows.append({"step": "unfold", "norm": norm, "acted": False, "residual": round(residual, 6), "note": note})
            continue
        for x in names:
            state.edit(f"{x}.weight", "div_cols", g)
        state.edit(key, "set", g.float())
        rows.append({"step": "unfold", "norm": norm, "readers": names, "residual": round(residual, 6), "acted": True})
    return rows


def _rope_index(rows: int, heads: int) -> torch.Tensor:
    """The gather index that undoes llama.cpp's rotary row order in a projection of ``rows`` rows."""
    import torch

    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(rows)


def _rope_unreordered(state: LazyState, layout: Layout) -> LazyState:
    out = state.copy()
    for b in layout.blocks:
        for name, n in ((b.q, layout.heads), (b.k, layout.kv_heads)):
            for role in ("weight", "bias"):
                key = f"{name}.{role}"
                if key in out:
                    out.edit(key, "rows", _rope_index(out.shapes[key][0], n))
    return out


def _heads_scores(s: LazyState, r: LazyState, layout: Layout, *, basis: bool, rope: bool) -> tuple[float, float]:
    """The mean matched head similarity over the blocks, rows as stored and (``rope``) reordering undone
    (else the first figure twice); each block read once."""
    fs, fr = _Frame(s, layout, basis=basis), _Frame(r, layout, basis=basis)
    as_is, undone = [], []
    for b in layout.blocks:
        ref = _head_features(fr, b)
        mine = _head_features(fs, b)
        as_is.append(_match_head_features(mine, ref, layout)[2])
        if rope:
            d = layout.head_dim
            for key, n in (("q", layout.heads), ("k", layout.kv_heads)):
                flat = mine[key].reshape(n * d, -1)  # rows of one head are contiguous in each block's features
                mine[key] = _blocks(flat[_rope_index(n * d, n)], d)
            undone.append(_match_head_features(mine, ref, layout)[2])
    first = sum(as_is) / len(as_is)
    return first, (sum(undone) / len(undone) if undone else first)


def _not_rotated(s: LazyState, r: LazyState, layout: Layout) -> bool:
    """The cheap test: the suspect's embedding is the reference's up to float rounding."""
    import torch

    if layout.embed is None:
        return True  # no embedding: the rows are compared as they stand anyway
    e_s, e_r = s[f"{layout.embed}.weight"], r[f"{layout.embed}.weight"]
    diff = ref = 0.0
    for j in range(0, len(e_r), 4096):  # in slices: no float64 copy of a 32000 x 4096 embedding
        diff += float(torch.linalg.vector_norm(e_s[j : j + 4096] - e_r[j : j + 4096]).double() ** 2)
        ref += float(torch.linalg.vector_norm(e_r[j : j + 4096]).double() ** 2)
    return bool(diff**0.5 <= EMBEDDING_ROUNDING * ref**0.5)


def _align(state: LazyState, r: LazyState, layout: Layout) -> tuple[LazyState, list[dict[str, Any]], bool]:
    import torch

    from auditor.toolkit.transformers import head_rows

    rows: list[dict[str, Any]] = []
    changed = False
    basis = not _not_rotated(state, r, layout)
    if layout.rotary and layout.head_dim % 2 == 0:
        as_is, undone = _heads_scores(state, r, layout, basis=basis, rope=True)
        acted = undone > as_is + ROPE_MARGIN
        rows.append({"step": "rope-order", "score_as_stored": round(as_is, 6), "score_reordering_undone":
                     round(undone, 6), "acted": acted})  # fmt: skip
        if acted:
            state, changed = _rope_unreordered(state, layout), True
    # Built once: a frame reads its state's tensors (with the edits so far) when asked, and the embedding and
    # LM head it projects through are not edited here.
    fs, fr = _Frame(state, layout, basis=basis), _Frame(r, layout, basis=basis)
    for i, block in enumerate(layout.blocks):
        groups, q_heads, head_score = _match_heads(fs, fr, block)
        units = _match_units(fs, fr, block)
        moved_heads = int((q_heads != torch.arange(len(q_heads))).sum())
        moved_units = int((units.index != torch.arange(len(units.index))).sum())
        if moved_heads:
            k_index, q_index = head_rows(layout, groups), head_rows(layout, q_heads)
            for name, index in ((block.q, q_index), (block.k, k_index), (block.v, k_index)):
                state.edit(f"{name}.weight", "rows", index)
                if f"{name}.bias" in state:
                    state.edit(f"{name}.bias", "rows", index)
            state.edit(f"{block.o}.weight", "cols", q_index)
        if moved_units:
            for reader in (block.gate, block.up):
                if reader is not None:
                    state.edit(f"{reader}.weight", "rows", units.index)
                    if f"{reader}.bias" in state:
                        state.edit(f"{reader}.bias", "rows", units.index)
            state.edit(f"{block.down}.weight", "cols", units.index)
        scaled = _unscale(state, fs, fr, block, layout)
        changed = changed or bool(moved_heads or moved_units or scaled)
        rows.append({"step": "block", "block": i, "heads_moved": moved_heads, "query_head_order": q_heads.tolist(),
                     "head_similarity": round(head_score, 6), "units_moved": moved_units,
                     "unit_similarity": round(units.score, 6), "units_clear": units.clear,
                     "units_ambiguous": units.ambiguous, "factors_divided": scaled})  # fmt: skip
    if layout.rms and layout.embed is not None and layout.lm_head is not None:
        if basis:
            row = _unrotate(state, r, layout)
        else:
            row = {"step": "rotation", "acted": False,
                   "note": "the residual stream is not rotated (the embedding is the reference's)"}  # fmt: skip
        rows.append(row)
        changed = changed or row["acted"]
    unfolded = _unfold(state, r, layout)
    rows += unfolded
    changed = changed or any(x["acted"] for x in unfolded)
    return state, rows, changed


def align_transformer(s: Mapping[str, torch.Tensor], r: Mapping[str, torch.Tensor],
                      layout: Layout) -> tuple[State, list[dict[str, Any]], bool]:  # fmt: skip
    """The suspect state brought into the reference's form, one log row per step, and whether anything
    changed (see the module docstring). Takes tensors in memory; :class:`TransformerRestorer` streams."""
    from auditor.plugins.restore.lazy import LazyState

    state, rows, changed = _align(LazyState.of_tensors(s), LazyState.of_tensors(r), layout)
    return {k: state[k] for k in state}, rows, changed


_NOT_OURS = "not a transformer this restorer reads (Llama-style or GPT-2 decoder, BERT or ViT encoder)"

#: Head sizes tried when no config.json says (largest first).
HEAD_SIZES = (256, 128, 96, 80, 64, 48, 32, 16, 8)


def guess_layout(s: LazyState, r: LazyState) -> Layout | None:
    """Without a config.json: the largest head size whose head matching (rotary order as stored or undone)
    scores within 0.005 of the best size's. Larger blocks than the real heads match only where no head moved,
    smaller ones split rotary pairs and groups. ``s`` and ``r`` are in the file's layout (GPT-2 fused)."""
    from auditor.toolkit.transformers import layout_of

    first = layout_of(r.shaped(), None, head_dim=1)  # only where the blocks are
    if first is None:
        return None
    s_split, r_split = _split(s, first), _split(r, first)
    basis = not _not_rotated(s_split, r_split, first)
    q_rows = r_split.shapes[f"{first.blocks[0].q}.weight"][0]
    k_rows = r_split.shapes[f"{first.blocks[0].k}.weight"][0]
    scored = []
    for d in HEAD_SIZES:
        if q_rows % d or k_rows % d or (q_rows // d) % (k_rows // d):
            continue
        layout = layout_of(r.shaped(), None, head_dim=d)
        assert layout is not None
        rope = layout.rotary and d % 2 == 0
        score = max(_heads_scores(s_split, r_split, layout, basis=basis, rope=rope))
        scored.append((score, d, layout))
    if not scored:
        return first
    best = max(x[0] for x in scored)
    return next(layout for score, _, layout in scored if score >= best - 0.005)


def _refs(graph: LayerGraph) -> dict[str, TensorRef]:
    return {f"{layer.name}.{role}": t for layer in graph.layers for role, t in layer.params.items()}


def _flat(graph: LayerGraph, keys: Container[str] | None = None) -> LazyState:
    """The graph's tensors by ``layer.role`` (those among ``keys``, if given), read when asked for (see
    :mod:`.lazy`)."""
    from auditor.plugins.restore.lazy import LazyState

    return LazyState.of_refs({k: t for k, t in _refs(graph).items() if keys is None or k in keys})


def _columns_t(read: Callable[[], torch.Tensor], start: int, stop: int) -> torch.Tensor:
    return read()[:, start:stop].T.contiguous()


def _entries(read: Callable[[], torch.Tensor], start: int, stop: int) -> torch.Tensor:
    return read()[start:stop]


def _transposed(read: Callable[[], torch.Tensor]) -> torch.Tensor:
    return read().T.contiguous()


def _split(state: LazyState, layout: Layout) -> LazyState:
    """GPT-2's fused Conv1D state in the edits' layout (:func:`~auditor.toolkit.transformers.split_conv1d`),
    read lazily; other layouts as they are."""
    from auditor.plugins.restore.lazy import LazyState

    if layout.kind != "gpt2":
        return state
    sources, shapes = dict(state.sources), dict(state.shapes)
    for b in layout.blocks:
        p = b.q.rsplit(".attn.", 1)[0]
        w, shape = sources.pop(f"{p}.attn.c_attn.weight"), shapes.pop(f"{p}.attn.c_attn.weight")
        bias = sources.pop(f"{p}.attn.c_attn.bias", None)
        shapes.pop(f"{p}.attn.c_attn.bias", None)
        h = shape[1] // 3
        for i, part in enumerate((b.q, b.k, b.v)):
            sources[f"{part}.weight"] = partial(_columns_t, w, i * h, (i + 1) * h)
            shapes[f"{part}.weight"] = (h, shape[0])
            if bias is not None:
                sources[f"{part}.bias"] = partial(_entries, bias, i * h, (i + 1) * h)
                shapes[f"{part}.bias"] = (h,)
        for name in (b.o, b.up, b.down):
            sources[f"{name}.weight"] = partial(_transposed, sources[f"{name}.weight"])
            shapes[f"{name}.weight"] = shapes[f"{name}.weight"][::-1]
    return LazyState(sources, shapes)


def _merged(state: LazyState, layout: Layout, refs: Mapping[str, TensorRef]) -> dict[str, TensorRef]:
    """The changed tensors, under the file's keys and layout (GPT-2's fused again), as readers."""
    import torch

    out: dict[str, TensorRef] = {}
    fused: dict[str, str] = {}
    if layout.kind == "gpt2":
        for b in layout.blocks:
            p = b.q.rsplit(".attn.", 1)[0]
            for role in ("weight", "bias"):
                key = f"{p}.attn.c_attn.{role}"
                parts = [f"{x}.{role}" for x in (b.q, b.k, b.v)]
                if key in refs and any(state.changed(x) for x in parts):

                    def read(parts: list[str] = parts, role: str = role) -> torch.Tensor:
                        return torch.cat([state[x].T if role == "weight" else state[x] for x in parts],
                                         dim=1 if role == "weight" else 0)  # fmt: skip

                    out[key] = state.ref(key, refs[key].name, read, refs[key].shape)
            for name in (b.o, b.up, b.down):
                fused[f"{name}.weight"] = f"{name}.weight"
    for key in refs:
        if key in out or key not in state or not state.changed(key):
            continue
        if key in fused:
            out[key] = state.ref(key, refs[key].name, partial(_transposed, partial(state.__getitem__, key)),
                                 refs[key].shape)  # fmt: skip
        else:
            out[key] = state.ref(key, refs[key].name)
    return out


def _in_place(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean |cosine| of ``a``'s rows with ``b``'s where they stand, each input column at unit norm first (as
    :func:`~.similarity.unit_inputs` does for the plan)."""
    import torch

    x = a / (a * a).sum(0).sqrt().clamp_min(1e-12)
    y = b / (b * b).sum(0).sqrt().clamp_min(1e-12)
    dot = torch.einsum("ij,ij->i", x, y)
    norms = torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(y, dim=1)
    return float((dot / norms.clamp_min(1e-12)).abs().nan_to_num(0.0).mean())


def in_place_matches(rewritten: LayerGraph, reference: LayerGraph) -> dict[str, LayerMatch]:
    """The guard's evidence without a channel plan: each linear layer's rows against the reference's where
    they stand (input columns at unit norm, as the plan compares them), one tensor pair at a time. A
    rewritten suspect in the reference's form scores what the plan would (it moves nothing); anything else
    scores at most what the plan's matching would manufacture."""
    from auditor.graph import LayerKind
    from auditor.plugins.restore.plan import LayerMatch

    refs = {layer.name: layer for layer in reference.layers}
    out = {}
    for layer in rewritten.layers:
        ref = refs.get(layer.name)
        w, rw = layer.weight, ref.weight if ref is not None else None
        if layer.kind is not LayerKind.LINEAR or w is None or rw is None or len(w.shape) != 2 or w.shape != rw.shape:
            continue
        score = _in_place(w.read(float32=True), rw.read(float32=True))
        out[layer.name] = LayerMatch(layer.name, layer.name, w.numel, w.shape[1], score, score, True)
    return out


class TransformerRestorer(StructuralRestorer):
    """Undoes the function-preserving edits of a transformer against the reference (see :mod:`.heads`)."""

    id = "restore-transformer"
    order = 8
    rows_key: ClassVar[str] = "steps"
    description = ("Put a transformer's rotary row order, heads, MLP units, head scales, residual rotation "
                   "and norm weights back in the reference's form.")  # fmt: skip
    #: Above this many parameters the guard compares rows in place (:func:`in_place_matches`).
    plan_limit: ClassVar[int] = PLAN_LIMIT
    streams: ClassVar[bool] = True

    def judge(self, rewritten: LayerGraph, reference: LayerGraph) -> tuple[dict[str, LayerMatch], str, list[str]]:
        """The channel plan's matches up to :attr:`plan_limit` parameters; above it, the rows in place."""
        if rewritten.parameter_count <= self.plan_limit:
            return super().judge(rewritten, reference)
        note = (f"{rewritten.parameter_count} parameters (more than {self.plan_limit}): each linear layer's rows "
                "compared with the reference's where they stand, no channel plan")  # fmt: skip
        return in_place_matches(rewritten, reference), "in place", [note]

    def rewrite(
        self, suspect: LayerGraph, reference: LayerGraph
    ) -> tuple[LayerGraph | None, list[dict[str, Any]], list[dict[str, Any]], str]:
        """The aligned suspect (None: not a transformer, or already in the reference's form), the steps,
        one layer row per changed matrix, and why."""
        import torch

        from auditor.errors import UsageError
        from auditor.toolkit.transformers import layout_of, read_config

        refs = _refs(reference)
        if layout_of(refs, None, head_dim=1) is None:  # names and shapes only: nothing is read for other models
            return None, [], [], _NOT_OURS
        s = _flat(suspect)
        # An export may fold a tensor into a constant (GPT-2's position table in an ONNX file of fixed length):
        # the reference's tensors the suspect lacks are left out, if the layout does not read them.
        absent = sorted(k for k in refs if k not in s.shapes)
        if absent and layout_of({k: t for k, t in refs.items() if k in s.shapes}, None, head_dim=1) != layout_of(
            refs, None, head_dim=1
        ):
            return None, [], [], "the suspect's transformer layout or shapes differ from the reference's"
        refs = {k: t for k, t in refs.items() if k in s.shapes}
        r = _flat(reference, refs)
        config = read_config(reference.path) or read_config(suspect.path)
        if any(k not in s.shapes or s.shapes[k] != v for k, v in r.shapes.items()) or len(s) != len(r):
            return None, [], [], "the suspect's transformer layout or shapes differ from the reference's"
        try:
            layout = layout_of(refs, config) if config else guess_layout(s, r)
        except UsageError as exc:
            return None, [], [], f"the reference's heads cannot be read: {exc}"
        if layout is None:
            return None, [], [], _NOT_OURS
        guess = "" if config else f" (no config.json: heads of {layout.head_dim} dimensions, the best-matching size)"
        if absent:
            guess += f" (not in the suspect, not compared: {', '.join(absent)})"
        state, rows, changed = _align(_split(s, layout), _split(r, layout), layout)
        if not changed:
            notes = "; ".join(f"{x['step']}: {x['note']}" for x in rows if x.get("note") and not x.get("acted"))
            return None, rows, [], "nothing to undo" + guess + (f" ({notes})" if notes else "")
        rewritten = _merged(state, layout, _refs(suspect))
        tensors: dict[str, dict[str, TensorRef]] = {}
        layers = []
        for layer in suspect.layers:
            roles = [role for role in layer.params if f"{layer.name}.{role}" in rewritten]
            if not roles:
                continue
            tensors[layer.name] = {role: rewritten.get(f"{layer.name}.{role}", t) for role, t in layer.params.items()}
            num = den = 0.0
            for role in layer.params:  # one tensor pair at a time
                mine = tensors[layer.name][role].read(float32=True)
                theirs = refs[f"{layer.name}.{role}"].read(float32=True)
                num += float(torch.linalg.norm(mine - theirs))
                den += float(torch.linalg.norm(theirs))
            note = f"restored (relative difference from the reference {num / max(den, 1e-30):.2g})"
            layers.append({"name": layer.name, "reference": layer.name, "note": note})
        steps = [x["step"] for x in rows if x.get("acted") or x.get("heads_moved") or x.get("units_moved")
                 or x.get("factors_divided")]  # fmt: skip
        why = f"transformer aligned with the reference ({', '.join(dict.fromkeys(steps))}){guess}"
        return _with_refs(suspect, tensors, f"restore-transformer: {why}"), rows, layers, why


def _with_refs(graph: LayerGraph, tensors: Mapping[str, Mapping[str, TensorRef]], note: str) -> LayerGraph:
    """A copy of ``graph`` whose named layers hold the given tensor references (read when asked for)."""
    import dataclasses

    layers = [dataclasses.replace(layer, params=dict(tensors.get(layer.name, layer.params)), attrs=dict(layer.attrs))
              for layer in graph.layers]  # fmt: skip
    return dataclasses.replace(graph, layers=layers, edges=list(graph.edges), files=list(graph.files),
                               metadata=dict(graph.metadata), notes=[*graph.notes, note])  # fmt: skip
