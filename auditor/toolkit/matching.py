"""Shared by the detectors: an owner bundle's payload, and an owner's layer found in a suspect.

Both detectors describe the owner's layers the same way (``name``, ``param``,
``kind``, ``shape``, ``kind_index``) and look them up with :func:`find_layer`,
so a suspect whose names were lost in an export is still read, and a layer
whose channel count changed is reported as a job for the restore stage rather
than read at shifted positions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from auditor.graph import Layer, LayerGraph

__all__ = ["BY_NAME", "BY_ORDER", "MISSING", "LayerIndex", "LayerMatch", "find_layer", "missing_layer", "unpack_bundle"]

BY_NAME = "by name"
BY_ORDER = "by kind, shape and order"
MISSING = "missing"


@dataclass(frozen=True)
class LayerMatch:
    """Where a bundle layer was found in the suspect: ``layer`` is None when missing."""

    layer: Layer | None
    found_by: str
    note: str = ""


@dataclass(frozen=True)
class LayerIndex:
    """A suspect's layers by name and by kind, built once for all the bundle layers looked up in it, so that
    finding them costs one pass over the suspect, not one pass per bundle layer. Build it afresh after the
    graph changes."""

    by_name: Mapping[str, Layer]
    by_kind: Mapping[str, list[Layer]]

    @classmethod
    def of(cls, graph: LayerGraph) -> LayerIndex:
        """The index of ``graph`` as it is now (the first layer of a name wins, as ``graph.layer`` does)."""
        by_name: dict[str, Layer] = {}
        by_kind: dict[str, list[Layer]] = {}
        for layer in graph.layers:
            by_name.setdefault(layer.name, layer)
            by_kind.setdefault(layer.kind.value, []).append(layer)
        return cls(by_name, by_kind)


def _param_shape(layer: Layer, param: str) -> tuple[int, ...] | None:
    ref = layer.params.get(param)
    return None if ref is None else ref.shape


def find_layer(suspect: LayerGraph, entry: Mapping[str, Any], index: LayerIndex | None = None) -> LayerMatch:
    """The suspect layer for one bundle layer: by name (same name, kind and shape),
    else the ``kind_index``-th suspect layer of that kind if its shape agrees, else
    the only suspect layer of that kind and shape, else missing. Pass the suspect's
    :class:`LayerIndex` when looking up several bundle layers."""
    name, kind, param = str(entry["name"]), str(entry["kind"]), str(entry.get("param", "weight"))
    shape = tuple(int(s) for s in entry["shape"])
    index_ = index if index is not None else LayerIndex.of(suspect)
    same_kind = index_.by_kind.get(kind, [])
    named = index_.by_name.get(name)
    if named is not None and named.kind.value == kind and _param_shape(named, param) == shape:
        return LayerMatch(named, BY_NAME)
    nth = entry.get("kind_index")
    ordered = same_kind[nth] if isinstance(nth, int) and 0 <= nth < len(same_kind) else None
    if ordered is not None and _param_shape(ordered, param) == shape:
        return LayerMatch(ordered, BY_ORDER)
    same_shape = [layer for layer in same_kind if _param_shape(layer, param) == shape]
    if len(same_shape) == 1:
        return LayerMatch(same_shape[0], BY_ORDER, "the only suspect layer of that kind and shape")
    closest = named if named is not None and named.kind.value == kind else ordered
    other = _param_shape(closest, param) if closest is not None else None
    if closest is not None and other is not None and len(other) == len(shape) and other[2:] == shape[2:]:
        return LayerMatch(
            None,
            MISSING,
            f"suspect layer {closest.name} has {list(other)} where the owner's had {list(shape)}: channels were"
            " cut off or added, so the restore stage must align it with the owner's reference model first",
        )
    return LayerMatch(None, MISSING, f"no suspect layer of kind {kind} with shape {list(shape)}")


def missing_layer(graph: LayerGraph, entries: Any, *, none: str, malformed: str, like: str) -> str | None:
    """Why ``graph`` is not the architecture a bundle's layer ``entries`` describe, in the scheme's words:
    ``none`` when there are no entries, ``malformed`` when one is not a layer entry, else the first entry with
    no suspect layer of its kind and shape (:func:`find_layer`), as "it has no KIND layer of shape S like "
    followed by ``like`` formatted with the entry's ``name``; ``None`` when every entry is found."""
    if not isinstance(entries, list) or not entries:
        return none
    index = LayerIndex.of(graph)
    for entry in entries:
        if not isinstance(entry, Mapping) or not {"name", "kind", "shape"} <= set(entry):
            return malformed
        try:
            match = find_layer(graph, entry, index)
        except (TypeError, ValueError):
            return malformed
        if match.layer is None:
            shape = "x".join(str(s) for s in entry["shape"]) if isinstance(entry["shape"], list) else "?"
            return f"it has no {entry['kind']} layer of shape {shape} like {like.format(name=entry['name'])}"
    return None


def unpack_bundle(bundle: Any, scheme: str = "") -> tuple[dict[str, Any], str]:
    """The payload and sha256 of an OwnerBundle, a {"payload": ...} mapping or a bare payload."""
    if isinstance(bundle, Mapping):
        payload = bundle.get("payload", bundle)
        sha = bundle.get("sha256")
    else:
        payload = getattr(bundle, "payload", None)
        sha = getattr(bundle, "sha256", None)
    if not isinstance(payload, Mapping):
        raise ValueError(f"the {scheme or 'owner'} bundle holds no payload")
    if not isinstance(sha, str) or not sha:
        sha = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return dict(payload), sha
