"""The channel plan: for every channel space of the suspect, which suspect channel goes where.

Spaces are matched from the input side in the reference's layer order. A
space's similarity is the mean over its producers (both branches of a
residual add) of their row similarities: full rows where the producer's
input channels are already aligned, order-free features where they are not
yet (a producer met before the layers that feed it). Since a later space can
change an earlier producer's inputs, the matching repeats until no index
changes (at most :data:`PASSES` times).

Who reads which space comes from a real graph when either model has one.
Without one (two bare state dicts) the edges are guesses that miss skip
connections, so each layer's input is chosen from the data instead: among
the spaces of a fitting width, the one under whose order the layer's rows
match the reference best (ties: one that closes no loop, then the nearest
producer before it; none where no space fits: the model's input). The plan records, per producer, the similarity
before (rows in place) and after (matched rows, inputs aligned): the guard's
evidence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from auditor.graph import Edge, Layer, LayerGraph
from auditor.plugins.restore import similarity
from auditor.plugins.restore.align import Alignment, align_layers, effective_edges
from auditor.toolkit.channels import Consumer, Space, apply_channel_maps, channel_spaces, input_params
from auditor.toolkit.channels import is_pass_through as _per_channel

__all__ = ["MIN_PAIR", "PASSES", "LayerMatch", "Plan", "creates_cycle", "make_plan"]

#: Rounds of matching at most; two suffice unless a producer comes before its inputs in the reference.
PASSES = 3
#: Where channel counts differ, a pair below this |cosine| is no pair (see ``similarity.assign``).
MIN_PAIR = 0.5

Source = tuple[Space, Consumer]


@dataclass
class LayerMatch:
    """One suspect producer against its reference counterpart."""

    layer: str
    reference: str
    weights: int
    row_length: int  # weights per output channel in the reference
    before: float | None  # mean |cos| of rows in place, as the suspect stands (None: shapes differ)
    after: float  # mean |cos| of the matched rows with the inputs aligned; padded slots count as 0
    inputs_aligned: bool
    moved: int = 0
    padded: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    frozen: str = ""


@dataclass
class Plan:
    """Everything the channel restorer needs and logs: spaces (with their readers), one index per free space."""

    alignment: Alignment
    edges: list[Edge]
    edges_from: str
    spaces: list[Space]
    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    matches: dict[str, LayerMatch] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    readers_from_data: bool = False  # no real graph: each layer's input space was chosen by similarity


def creates_cycle(reads: Mapping[str, set[int]], producers: Mapping[int, list[str]], reader: str, space: int) -> bool:
    """Whether ``reader`` reading ``space`` closes a loop: some producer of ``space`` (directly or
    through what it reads) reads ``reader``'s own output. ``reads`` maps a layer to the spaces it reads."""
    stack, seen = [space], set()
    while stack:
        sid = stack.pop()
        if sid in seen:
            continue
        seen.add(sid)
        for p in producers.get(sid, []):
            if p == reader:
                return True
            stack.extend(reads.get(p, set()))
    return False


def _digest(index: torch.Tensor | None) -> bytes | None:
    return None if index is None else index.numpy().tobytes()


class _Matcher:
    def __init__(self, suspect: LayerGraph, reference: LayerGraph, plan: Plan, trusted: bool) -> None:
        self.s_layers = {layer.name: layer for layer in suspect.layers}
        r_layers = {layer.name: layer for layer in reference.layers}
        self.suspect, self.plan, self.trusted = suspect, plan, trusted
        self.r_pos = {layer.name: i for i, layer in enumerate(reference.layers)}
        pairs = plan.alignment.pairs
        producers = [p for sp in plan.spaces for p in sp.producers if pairs.get(p) in r_layers]
        self.weights = {p: self.s_layers[p].params["weight"].read(float32=True) for p in producers}
        self.ref_weights = {p: r_layers[pairs[p]].params["weight"].read(float32=True) for p in producers}
        self.sources: dict[str, list[Source]] = {}
        self._cache: dict[tuple[object, ...], tuple[torch.Tensor, bool]] = {}
        self._ref_unit: dict[str, torch.Tensor] = {}
        for sp in plan.spaces:
            for c in sp.consumers:
                self.sources.setdefault(c.layer, []).append((sp, c))

    def aligned(self, name: str, maps: Mapping[int, torch.Tensor], sources: list[Source] | None = None) -> tuple[
        torch.Tensor, bool]:  # fmt: skip
        """The producer's weight with its input channels in reference order, and whether that worked."""
        sources = self.sources.get(name, []) if sources is None else sources
        if any(sp.id not in maps and not sp.frozen for sp, _ in sources):
            return self.weights[name], False
        # Only the reading side: a layer that also produces the space (a residual block's second
        # convolution) keeps its rows where they are, so that they can be matched.
        spaces = [
            dataclasses.replace(sp, producers=[], passthrough=[], consumers=[c], frozen="")
            for sp, c in sources
            if sp.id in maps
        ]
        use = {sp.id: maps[sp.id] for sp in spaces}
        w = apply_channel_maps(self.suspect, {name: {"weight": self.weights[name]}}, spaces, use)[name]["weight"]
        return w, tuple(w.shape[1:]) == tuple(self.ref_weights[name].shape[1:])

    def similarity(
        self, name: str, maps: Mapping[int, torch.Tensor], sources: list[Source] | None = None, *, plain: bool = False
    ) -> tuple[torch.Tensor, bool]:
        """``name``'s rows against the reference's (suspect x reference), and whether inputs were aligned.

        With inputs aligned the rows are compared over the suspect's non-zero weights (pruning is
        no evidence against a match), or by the plain |cosine| with ``plain`` (the guard's evidence,
        as calibrated). Cached by the input order used: a later pass, or the report, asks again."""
        sources = self.sources.get(name, []) if sources is None else sources
        key = (name, plain, tuple((sp.id, c.offset, c.block, _digest(maps.get(sp.id))) for sp, c in sources))
        if key not in self._cache:
            w, ok = self.aligned(name, maps, sources)
            if name not in self._ref_unit:
                self._ref_unit[name] = similarity.unit_inputs(self.ref_weights[name])
            ref = self._ref_unit[name]
            # Each input channel's weights at unit norm: a channel scaled by c upstream and 1/c here (or
            # cut off, or fine-tuned to another size) then leaves the rows' directions alone.
            w = similarity.unit_inputs(w)
            if ok:
                cosine = similarity.abs_cosine if plain else similarity.masked_abs_cosine
                self._cache[key] = cosine(similarity.rows(w), similarity.rows(ref)), True
            else:
                self._cache[key] = similarity.order_free_similarity(w, ref), False
        return self._cache[key]

    def candidates(self, name: str) -> list[list[Source]]:
        """Possible inputs of ``name`` when no graph says: no space, or one space of a fitting width."""
        layer = self.s_layers[name]
        roles = input_params(layer)
        if not roles or name not in self.weights:
            return [[]]
        width = layer.params[roles[0]].shape[1]
        found: list[list[Source]] = [[]]
        for sp in self.plan.spaces:
            if sp.producers and name not in sp.producers and _fits(sp.width, width, layer):
                found.append([(sp, Consumer(name, 0, width // sp.width))])
        return found

    def choose_source(self, name: str, maps: Mapping[int, torch.Tensor]) -> None:
        """The input for ``name`` whose order makes its rows match the reference best.

        A space of the right width always beats "no space": a layer reading one in the
        reference's order scores the same either way, and only the model's input is no space."""
        options = self.candidates(name)
        spaced = [o for o in options if o] or options
        mine = self.r_pos.get(self.plan.alignment.pairs.get(name, ""), 0)

        def distance(option: list[Source]) -> int:
            # Ties (every space already in the reference's order) go to the nearest producer before the reader.
            pos = [self.r_pos.get(self.plan.alignment.pairs.get(p, ""), 0) for sp, _ in option for p in sp.producers]
            return min((mine - q if q < mine else len(self.r_pos) + q for q in pos), default=0)

        reads = {k: {sp.id for sp, _ in v} for k, v in self.sources.items() if k != name}
        producers = {sp.id: sp.producers for sp in self.plan.spaces}
        best, best_key = self.sources.get(name, []), (-2.0, False, 0)
        for option in spaced:
            if option and any(sp.id not in maps and not sp.frozen for sp, _ in option):
                continue  # that space is not matched yet: it can be tried on the next pass
            sim, ok = self.similarity(name, maps, option)
            if not ok and option:
                continue
            _, pair = similarity.assign(sim)
            score = float(pair.mean()) if ok else -0.5  # order-free only if nothing else fits
            # Ties (every space in the reference's order already) go to an input that closes no loop,
            # then to the nearest producer before the reader.
            loop = any(creates_cycle(reads, producers, name, sp.id) for sp, _ in option)
            key = (round(score, 6), not loop, -distance(option))
            if key > best_key:
                best, best_key = option, key
        self.sources[name] = best

    def space_similarity(self, space: Space, maps: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """The mean similarity over the space's producers; order-free ones count only while no
        producer has its inputs aligned (they are far noisier than full rows)."""
        full: list[torch.Tensor] = []
        free: list[torch.Tensor] = []
        for name in space.producers:
            if not self.trusted:
                self.choose_source(name, maps)
            sim, ok = self.similarity(name, maps)
            (full if ok else free).append(sim)
        return torch.stack(full or free).mean(dim=0)


def _fits(space_width: int, input_width: int, reader: Layer) -> bool:
    """Whether a space of ``space_width`` channels can be all of ``reader``'s input (flattened, for a linear layer)."""
    if not space_width or input_width % space_width:
        return False
    return input_width == space_width or reader.kind.value == "linear"


def _freeze_unmatched(spaces: list[Space], alignment: Alignment, reference: LayerGraph) -> None:
    r_layers = {layer.name: layer for layer in reference.layers}
    for space in spaces:
        if space.frozen:
            continue
        refs = [alignment.pairs.get(p) for p in space.producers]
        widths = {r_layers[r].out_channels if r in r_layers else None for r in refs}
        if not space.producers:
            space.frozen = "no layer produces it"
        elif len(widths) != 1 or None in widths:
            space.frozen = "its producers have no reference counterpart of one width"


def make_plan(suspect: LayerGraph, reference: LayerGraph, *, min_pair: float = MIN_PAIR) -> Plan:
    """Align layers, find the spaces and their readers, and match every free space (see the module docstring)."""
    alignment = align_layers(suspect, reference)
    edges, edges_from = effective_edges(suspect, reference, alignment)
    trusted = "graph" in edges_from and "inferred" not in edges_from
    layers = {layer.name: layer for layer in suspect.layers}
    if not trusted:  # only "a per-channel layer follows this one" is taken from guessed edges
        edges = [e for e in edges if _per_channel(layers[e.dst])]
    spaces = channel_spaces(suspect, edges)
    if not trusted:
        for space in spaces:
            if space.frozen.startswith("no layer is known to read it"):
                space.frozen = ""
    _freeze_unmatched(spaces, alignment, reference)
    plan = Plan(alignment, edges, edges_from, spaces, notes=list(alignment.notes), readers_from_data=not trusted)
    matcher = _Matcher(suspect, reference, plan, trusted)
    free = sorted(
        (sp for sp in spaces if not sp.frozen),
        key=lambda sp: min(matcher.r_pos[alignment.pairs[p]] for p in sp.producers),
    )
    if not trusted:
        # A space no layer is wide enough to read is the model's output, which must keep its order.
        readers = [(w, layer) for layer in suspect.layers if (roles := input_params(layer))
                   for w in [layer.params[roles[0]].shape[1]]]  # fmt: skip
        for space in free:
            if not any(_fits(space.width, w, r) for w, r in readers if r.name not in space.producers):
                space.frozen = "no layer is wide enough to read it: the model's output"
        free = [sp for sp in free if not sp.frozen]
    for _ in range(PASSES):
        changed = False
        for space in free:
            index, _ = similarity.assign(matcher.space_similarity(space, plan.maps), min_pair=min_pair)
            old = plan.maps.get(space.id)
            changed |= old is None or not torch.equal(old, index)
            plan.maps[space.id] = index
        if not changed:
            break
    if not trusted:
        for space in spaces:  # the output layer's input, which no pass needed to know
            if space.frozen:
                for name in (n for n in space.producers if n in matcher.weights):
                    matcher.choose_source(name, plan.maps)
        for space in spaces:
            space.consumers = [c for srcs in matcher.sources.values() for sp, c in srcs if sp.id == space.id]
    for space in spaces:
        for name in space.producers:
            if name in matcher.weights:
                plan.matches[name] = _report(matcher, space, name)
    return plan


def _report(matcher: _Matcher, space: Space, name: str) -> LayerMatch:
    plan = matcher.plan
    raw, ref = matcher.weights[name], matcher.ref_weights[name]
    before = None
    if raw.shape == ref.shape:
        a, b = similarity.rows(raw), similarity.rows(ref)
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
        before = float(cos.abs().mean())
    sim, ok = matcher.similarity(name, plan.maps, plain=True)
    match = LayerMatch(
        name, plan.alignment.pairs[name], raw.numel(), ref[0].numel() if len(ref) else 0, before, 0.0, ok,
        frozen=space.frozen,
    )  # fmt: skip
    if not ok:
        return match
    index = plan.maps.get(space.id)
    if index is None:  # frozen: rows stay where they are, and are compared in place
        match.after = float(sim.diagonal().sum() / sim.shape[1])
        return match
    hit = index >= 0
    slots = torch.arange(len(index))
    match.after = float(sim[index[hit], slots[hit]].sum() / len(index))
    match.moved = int((index[hit] != slots[hit]).sum())
    match.padded = slots[~hit].tolist()
    match.dropped = sorted(set(range(sim.shape[0])) - set(index[hit].tolist()))
    return match
